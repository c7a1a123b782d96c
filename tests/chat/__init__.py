"""Tests of imkit.chat."""
