"""Private (1:1) chat and offline messages: ids, message stores and the chat service."""
