/*
 * imkit._speedups: the WebSocket framing of an open connection's common case, in C.
 *
 * Optional: imkit.core._framing holds the same two functions in Python and uses
 * these only when this module was built (and IMKIT_NO_SPEEDUPS is not set). The two
 * must agree byte for byte and on every refusal: tests/core/test_framing.py compares
 * them on generated frames. No state, no I/O, no clock: plain functions of their
 * arguments, as everything in the sans-IO core.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define TEXT_FIN 0x81
#define MASK_BIT 0x80
/* Masked payloads up to this size are unmasked on the stack. */
#define STACK_PAYLOAD 1024

/* dst[i] = src[i] ^ key[i % 4] for i < n, eight bytes at a time. */
static void
xor_into(unsigned char *dst, const unsigned char *src, Py_ssize_t n, const unsigned char *key)
{
    uint32_t k32;
    uint64_t k64, v;
    Py_ssize_t i = 0;

    memcpy(&k32, key, 4);
    /* In memory: key[0..3] twice, whatever the byte order. */
    k64 = ((uint64_t)k32 << 32) | k32;
    for (; i + 8 <= n; i += 8) {
        memcpy(&v, src + i, 8);
        v ^= k64;
        memcpy(dst + i, &v, 8);
    }
    for (; i < n; i++) {
        dst[i] = src[i] ^ key[i & 3];
    }
}

/* Whether a function of n positional arguments got n; else raise TypeError. */
static int
check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t n)
{
    if (nargs != n) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd positional arguments (%zd given)", name,
                     n, nargs);
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(read_text_doc,
"read_text(data, pos, end, mask_bit, max_size, /)\n--\n\n"
"The whole text frame at data[pos:end] as (text, stop), or None if it is not a simple\n"
"one: FIN text opcode with no RSV bits, the mask bit equal to mask_bit, the shortest\n"
"length encoding, at most max_size bytes (a negative max_size refuses every frame),\n"
"complete before end, valid UTF-8.");

static PyObject *
read_text(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t pos, end, max_size, at, stop;
    long mask_bit;
    long long max_long;
    int overflow;
    uint64_t size;
    const unsigned char *buf;
    unsigned char stack[STACK_PAYLOAD];
    unsigned char *plain = NULL;
    PyObject *text = NULL, *stop_obj = NULL, *result = NULL;

    if (!check_nargs("read_text", nargs, 5)) {
        return NULL;
    }
    pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred()) {
        return NULL;
    }
    end = PyLong_AsSsize_t(args[2]);
    if (end == -1 && PyErr_Occurred()) {
        return NULL;
    }
    mask_bit = PyLong_AsLong(args[3]);
    if (mask_bit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    /* A limit past what memory can hold is no limit: clamp it. */
    max_long = PyLong_AsLongLongAndOverflow(args[4], &overflow);
    if (max_long == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (overflow > 0 || max_long > PY_SSIZE_T_MAX) {
        max_size = PY_SSIZE_T_MAX;
    }
    else if (overflow < 0 || max_long < 0) {
        max_size = -1;
    }
    else {
        max_size = (Py_ssize_t)max_long;
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (pos < 0 || pos > end || end > view.len) {
        PyErr_SetString(PyExc_ValueError, "need 0 <= pos <= end <= len(data)");
        goto done;
    }
    buf = (const unsigned char *)view.buf;
    if (end - pos < 2 || buf[pos] != TEXT_FIN || (buf[pos + 1] & MASK_BIT) != mask_bit) {
        goto refuse;
    }
    size = buf[pos + 1] & 0x7F;
    at = pos + 2;
    if (size == 126) {
        if (end - at < 2) {
            goto refuse;
        }
        size = ((uint64_t)buf[at] << 8) | buf[at + 1];
        at += 2;
        if (size < 126) {
            goto refuse;
        }
    }
    else if (size == 127) {
        if (end - at < 8) {
            goto refuse;
        }
        size = 0;
        for (int i = 0; i < 8; i++) {
            size = (size << 8) | buf[at + i];
        }
        at += 8;
        if (size < 0x10000) {
            goto refuse;
        }
    }
    if (max_size < 0 || size > (uint64_t)max_size) {
        goto refuse;
    }
    if (mask_bit) {
        if (end - at < 4) {
            goto refuse;
        }
        at += 4;
    }
    if ((uint64_t)(end - at) < size) {
        goto refuse;
    }
    stop = at + (Py_ssize_t)size;
    if (mask_bit) {
        if (size <= STACK_PAYLOAD) {
            plain = stack;
        }
        else {
            plain = PyMem_Malloc((size_t)size);
            if (plain == NULL) {
                PyErr_NoMemory();
                goto done;
            }
        }
        xor_into(plain, buf + at, (Py_ssize_t)size, buf + at - 4);
        text = PyUnicode_DecodeUTF8((const char *)plain, (Py_ssize_t)size, NULL);
        if (plain != stack) {
            PyMem_Free(plain);
        }
    }
    else {
        text = PyUnicode_DecodeUTF8((const char *)buf + at, (Py_ssize_t)size, NULL);
    }
    if (text == NULL) {
        if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear();
            goto refuse;
        }
        goto done;
    }
    stop_obj = PyLong_FromSsize_t(stop);
    result = stop_obj == NULL ? NULL : PyTuple_New(2);
    if (result == NULL) {
        Py_DECREF(text);
        Py_XDECREF(stop_obj);
        goto done;
    }
    PyTuple_SET_ITEM(result, 0, text);
    PyTuple_SET_ITEM(result, 1, stop_obj);
    goto done;
refuse:
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&view);
    return result;
}

PyDoc_STRVAR(frame_texts_doc,
"frame_texts(texts, keys, /)\n--\n\n"
"Each str of the list texts as one whole text frame (FIN, the shortest length\n"
"encoding), all in one bytes. keys None: unmasked (a server's frames); else 4 bytes per\n"
"text, the masking key of each frame in turn (a client's).");

static PyObject *
frame_texts(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *texts, *keys_obj, *result = NULL;
    Py_buffer keys;
    int masked;
    Py_ssize_t count, total = 0, i, n;
    const char *utf8;
    unsigned char *out;

    if (!check_nargs("frame_texts", nargs, 2)) {
        return NULL;
    }
    texts = args[0];
    keys_obj = args[1];
    if (!PyList_Check(texts)) {
        PyErr_SetString(PyExc_TypeError, "texts must be a list of str");
        return NULL;
    }
    masked = keys_obj != Py_None;
    if (masked && PyObject_GetBuffer(keys_obj, &keys, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    count = PyList_GET_SIZE(texts);
    if (masked && keys.len != 4 * count) {
        PyErr_SetString(PyExc_ValueError, "keys must hold 4 bytes per text");
        goto done;
    }
    for (i = 0; i < count; i++) {
        PyObject *text = PyList_GET_ITEM(texts, i);
        if (!PyUnicode_Check(text)) {
            PyErr_SetString(PyExc_TypeError, "texts must be a list of str");
            goto done;
        }
        if (PyUnicode_AsUTF8AndSize(text, &n) == NULL) {
            goto done;
        }
        total += (n < 126 ? 2 : n < 0x10000 ? 4 : 10) + (masked ? 4 : 0) + n;
    }
    result = PyBytes_FromStringAndSize(NULL, total);
    if (result == NULL) {
        goto done;
    }
    out = (unsigned char *)PyBytes_AS_STRING(result);
    for (i = 0; i < count; i++) {
        /* The list cannot have changed: nothing above runs Python code. */
        utf8 = PyUnicode_AsUTF8AndSize(PyList_GET_ITEM(texts, i), &n);
        *out++ = TEXT_FIN;
        if (n < 126) {
            *out++ = (unsigned char)((masked ? MASK_BIT : 0) | n);
        }
        else if (n < 0x10000) {
            *out++ = (unsigned char)((masked ? MASK_BIT : 0) | 126);
            *out++ = (unsigned char)(n >> 8);
            *out++ = (unsigned char)n;
        }
        else {
            *out++ = (unsigned char)((masked ? MASK_BIT : 0) | 127);
            for (int shift = 56; shift >= 0; shift -= 8) {
                *out++ = (unsigned char)((uint64_t)n >> shift);
            }
        }
        if (masked) {
            const unsigned char *key = (const unsigned char *)keys.buf + 4 * i;
            memcpy(out, key, 4);
            out += 4;
            xor_into(out, (const unsigned char *)utf8, n, key);
        }
        else {
            memcpy(out, utf8, (size_t)n);
        }
        out += n;
    }
done:
    if (masked) {
        PyBuffer_Release(&keys);
    }
    return result;
}

static PyMethodDef speedups_methods[] = {
    {"read_text", (PyCFunction)(void (*)(void))read_text, METH_FASTCALL, read_text_doc},
    {"frame_texts", (PyCFunction)(void (*)(void))frame_texts, METH_FASTCALL,
     frame_texts_doc},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot speedups_slots[] = {
    {0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "imkit._speedups",
    .m_doc = "The WebSocket framing of imkit's common case in C (optional; see "
             "imkit.core._framing).",
    .m_size = 0,
    .m_methods = speedups_methods,
    .m_slots = speedups_slots,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&speedups_module);
}
