/*
 * imkit._speedups: the WebSocket framing of an open connection's common case, and the
 * JSON text of the frames the server makes, in C.
 *
 * Optional: imkit.core._framing holds the same two framing functions in Python, and
 * imkit.core.frames the same encoder; they use these only when this module was built
 * (and IMKIT_NO_SPEEDUPS is not set). The two must agree byte for byte and on every
 * refusal: tests/core/test_framing.py and tests/core/test_codec_speedups.py compare
 * them on generated input. No state, no I/O, no clock: plain functions of their
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

/*
 * encode_frame: a frame as easy-chat's JSON text, as imkit.core.frames writes it in
 * Python (json's encoder with ensure_ascii=False and no spaces), for the data the
 * server's own frames carry: dicts with str keys, lists, tuples, str, int within 64
 * bits, True, False, None. Anything else (a float, a big int, a subclass, a key that is
 * not a str, nesting deeper than MAX_DEPTH) is not written here: the function answers
 * None and the Python encoder, which knows every case and every error, writes it.
 *
 * Two passes over the same walk: the first measures the text (its length and largest
 * character), the second writes it into a str made to that size. Nothing in either
 * pass runs Python code (exact types only), so the data cannot change between them.
 */
#define MAX_DEPTH 32
/* A walk's answers: written (or measured), or not for this encoder. */
#define JSON_OK 0
#define JSON_UNSUPPORTED 1

typedef struct {
    int writing;           /* 0: the measuring pass; 1: the writing pass */
    Py_ssize_t size;       /* measuring: the length so far */
    Py_UCS4 maxchar;       /* measuring: the largest character so far */
    int kind;              /* writing: the output's kind, data and position */
    void *data;
    Py_ssize_t pos;
} json_out;

static void
put_ascii(json_out *out, const char *text, Py_ssize_t n)
{
    if (!out->writing) {
        out->size += n;
        return;
    }
    if (out->kind == PyUnicode_1BYTE_KIND) {
        memcpy((Py_UCS1 *)out->data + out->pos, text, (size_t)n);
    }
    else {
        for (Py_ssize_t i = 0; i < n; i++) {
            PyUnicode_WRITE(out->kind, out->data, out->pos + i, (Py_UCS4)(unsigned char)text[i]);
        }
    }
    out->pos += n;
}

/* How many more characters than one json writes for each character below 256 in a
   string: 1 for '"', '\\' and the five short escapes (\n...), 5 for the rest below 0x20
   (\u00XX), 0 for every other. */
static const unsigned char EXTRA[256] = {
    5, 5, 5, 5, 5, 5, 5, 5, 1, 1, 1, 5, 1, 1, 5, 5,
    5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5,
    0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0,
    /* 0x60 and above: 0 */
};

/* json's escape of a character c with EXTRA[c] > 0, in esc; its length. */
static Py_ssize_t
escape_of(Py_UCS4 c, char *esc)
{
    static const char hex[] = "0123456789abcdef";

    esc[0] = '\\';
    switch (c) {
    case '"': esc[1] = '"'; return 2;
    case '\\': esc[1] = '\\'; return 2;
    case '\n': esc[1] = 'n'; return 2;
    case '\r': esc[1] = 'r'; return 2;
    case '\t': esc[1] = 't'; return 2;
    case '\b': esc[1] = 'b'; return 2;
    case '\f': esc[1] = 'f'; return 2;
    default:
        esc[1] = 'u';
        esc[2] = '0';
        esc[3] = '0';
        esc[4] = hex[c >> 4];
        esc[5] = hex[c & 0xF];
        return 6;
    }
}

/* A str as a JSON string: quoted, with json's escapes (ensure_ascii=False). */
static void
put_str(json_out *out, PyObject *text)
{
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    Py_ssize_t n = PyUnicode_GET_LENGTH(text), i;
    char esc[6];

    if (!out->writing) {
        Py_UCS4 maxchar = PyUnicode_MAX_CHAR_VALUE(text);
        Py_ssize_t size = n + 2;
        if (kind == PyUnicode_1BYTE_KIND) {
            const Py_UCS1 *chars = data;
            for (i = 0; i < n; i++) {
                size += EXTRA[chars[i]];
            }
        }
        else {
            for (i = 0; i < n; i++) {
                Py_UCS4 c = PyUnicode_READ(kind, data, i);
                if (c < 0x100) {
                    size += EXTRA[c];
                }
            }
        }
        out->size += size;
        if (maxchar > out->maxchar) {
            out->maxchar = maxchar;
        }
        return;
    }
    put_ascii(out, "\"", 1);
    if (kind == PyUnicode_1BYTE_KIND && out->kind == PyUnicode_1BYTE_KIND) {
        /* Runs without escapes are copied whole. */
        const Py_UCS1 *chars = data;
        Py_UCS1 *dst = out->data;
        Py_ssize_t run = 0;
        for (i = 0; i < n; i++) {
            if (EXTRA[chars[i]]) {
                memcpy(dst + out->pos, chars + run, (size_t)(i - run));
                out->pos += i - run;
                put_ascii(out, esc, escape_of(chars[i], esc));
                run = i + 1;
            }
        }
        memcpy(dst + out->pos, chars + run, (size_t)(n - run));
        out->pos += n - run;
    }
    else {
        for (i = 0; i < n; i++) {
            Py_UCS4 c = PyUnicode_READ(kind, data, i);
            if (c < 0x100 && EXTRA[c]) {
                put_ascii(out, esc, escape_of(c, esc));
            }
            else {
                PyUnicode_WRITE(out->kind, out->data, out->pos++, c);
            }
        }
    }
    put_ascii(out, "\"", 1);
}

/* An int of 64 bits or fewer in decimal; JSON_UNSUPPORTED for a bigger one. */
static int
put_int(json_out *out, PyObject *value)
{
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    unsigned long long u;
    char digits[24];
    char *at = digits + sizeof digits;

    if (overflow) {
        return JSON_UNSUPPORTED;
    }
    /* (-1 with no overflow is -1: an int cannot fail to convert otherwise.) */
    u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        *--at = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0) {
        *--at = '-';
    }
    put_ascii(out, at, digits + sizeof digits - at);
    return JSON_OK;
}

static int
put_value(json_out *out, PyObject *value, int depth)
{
    if (value == Py_None) {
        put_ascii(out, "null", 4);
        return JSON_OK;
    }
    if (value == Py_True) {
        put_ascii(out, "true", 4);
        return JSON_OK;
    }
    if (value == Py_False) {
        put_ascii(out, "false", 5);
        return JSON_OK;
    }
    if (PyUnicode_CheckExact(value)) {
        put_str(out, value);
        return JSON_OK;
    }
    if (PyLong_CheckExact(value)) {
        return put_int(out, value);
    }
    if (depth >= MAX_DEPTH) {
        return JSON_UNSUPPORTED;
    }
    if (PyDict_CheckExact(value)) {
        PyObject *key, *item;
        Py_ssize_t at = 0;
        int first = 1;
        put_ascii(out, "{", 1);
        while (PyDict_Next(value, &at, &key, &item)) {
            if (!PyUnicode_CheckExact(key)) {
                return JSON_UNSUPPORTED;
            }
            if (!first) {
                put_ascii(out, ",", 1);
            }
            first = 0;
            put_str(out, key);
            put_ascii(out, ":", 1);
            if (put_value(out, item, depth + 1) != JSON_OK) {
                return JSON_UNSUPPORTED;
            }
        }
        put_ascii(out, "}", 1);
        return JSON_OK;
    }
    if (PyList_CheckExact(value) || PyTuple_CheckExact(value)) {
        int list = PyList_CheckExact(value);
        Py_ssize_t n = list ? PyList_GET_SIZE(value) : PyTuple_GET_SIZE(value);
        put_ascii(out, "[", 1);
        for (Py_ssize_t i = 0; i < n; i++) {
            if (i) {
                put_ascii(out, ",", 1);
            }
            if (put_value(out, list ? PyList_GET_ITEM(value, i) : PyTuple_GET_ITEM(value, i),
                          depth + 1) != JSON_OK) {
                return JSON_UNSUPPORTED;
            }
        }
        put_ascii(out, "]", 1);
        return JSON_OK;
    }
    return JSON_UNSUPPORTED;
}

/* The whole frame; args as encode_frame's. */
static int
put_frame(json_out *out, PyObject *const *args)
{
    PyObject *reply_to = args[7];

    put_ascii(out, "{\"frameType\":", 13);
    if (put_int(out, args[0]) != JSON_OK) {
        return JSON_UNSUPPORTED;
    }
    put_ascii(out, ",\"id\":", 6);
    put_str(out, args[1]);
    put_ascii(out, ",\"ackSeq\":", 10);
    if (put_int(out, args[2]) != JSON_OK) {
        return JSON_UNSUPPORTED;
    }
    put_ascii(out, ",\"method\":", 10);
    put_str(out, args[3]);
    put_ascii(out, ",\"formId\":", 10);
    put_str(out, args[4]);
    put_ascii(out, ",\"transpondUid\":", 16);
    put_str(out, args[5]);
    put_ascii(out, ",\"data\":", 8);
    if (put_value(out, args[6], 0) != JSON_OK) {
        return JSON_UNSUPPORTED;
    }
    if (PyUnicode_GET_LENGTH(reply_to)) {
        put_ascii(out, ",\"replyTo\":", 11);
        put_str(out, reply_to);
    }
    put_ascii(out, "}", 1);
    return JSON_OK;
}

/* Whether int(v) is v's own value: an int, or a subclass of int (an IntEnum such as
   FrameType) that does not define __int__ (the Python encoder calls int()). */
static int
plain_int(PyObject *v)
{
    PyNumberMethods *number = Py_TYPE(v)->tp_as_number;

    return PyLong_CheckExact(v)
           || (PyLong_Check(v) && number != NULL
               && number->nb_int == PyLong_Type.tp_as_number->nb_int);
}

PyDoc_STRVAR(encode_frame_doc,
"encode_frame(frame_type, id, ack_seq, method, form_id, transpond_uid, data, reply_to, /)\n"
"--\n\n"
"The frame with these fields as one JSON text, as imkit.core.frames.encode_frame writes\n"
"it; None if a field is not of the types written here (frame_type an int that is its\n"
"own int(); ack_seq an exact int; the four ids, method and reply_to exact str; data of\n"
"dicts with str keys, lists, tuples, str, 64-bit ints, True, False, None): the Python\n"
"encoder writes those.");

static PyObject *
encode_frame(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    json_out out = {0};
    PyObject *text;

    if (!check_nargs("encode_frame", nargs, 8)) {
        return NULL;
    }
    if (!plain_int(args[0]) || !PyLong_CheckExact(args[2]) || !PyUnicode_CheckExact(args[1])
        || !PyUnicode_CheckExact(args[3]) || !PyUnicode_CheckExact(args[4])
        || !PyUnicode_CheckExact(args[5]) || !PyUnicode_CheckExact(args[7])) {
        Py_RETURN_NONE;
    }
    out.maxchar = 0x7F;
    if (put_frame(&out, args) != JSON_OK) {
        Py_RETURN_NONE;
    }
    text = PyUnicode_New(out.size, out.maxchar);
    if (text == NULL) {
        return NULL;
    }
    out.writing = 1;
    out.kind = PyUnicode_KIND(text);
    out.data = PyUnicode_DATA(text);
    put_frame(&out, args);
    assert(out.pos == out.size);
    return text;
}

/*
 * read_control: an Ack or a Ping exactly as imkit writes it, read off the text without
 * a JSON decoder (imkit.core.frames reads it with a regular expression otherwise):
 *
 *   {"frameType":1|2,"id":"<id>","ackSeq":<n>}  or the same with
 *   ,"method":"","formId":"","transpondUid":"","data":null  before the closing brace,
 *
 * where <id> has no '"', no '\\' and no character below 0x20 (so it needs no unescaping)
 * and <n> is 0 or up to 18 digits without a leading zero. Anything else is None.
 */
static const char CONTROL_HEAD[] = "{\"frameType\":";
static const char CONTROL_ID[] = ",\"id\":\"";
static const char CONTROL_SEQ[] = "\",\"ackSeq\":";
static const char CONTROL_REST[] = ",\"method\":\"\",\"formId\":\"\",\"transpondUid\":\"\",\"data\":null}";

/* Whether text[at:] starts with the ASCII literal lit (of n characters). */
static int
has_at(int kind, const void *data, Py_ssize_t len, Py_ssize_t at, const char *lit, Py_ssize_t n)
{
    if (at + n > len) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyUnicode_READ(kind, data, at + i) != (Py_UCS4)(unsigned char)lit[i]) {
            return 0;
        }
    }
    return 1;
}

PyDoc_STRVAR(read_control_doc,
"read_control(text, ack, ping, /)\n--\n\n"
"The fields of an Ack or Ping frame written exactly as imkit writes it, as\n"
"(ack or ping, id, ackSeq, '', '', '', None, ''): ack for frameType 2, ping for 1;\n"
"None for any other text (the JSON decoder reads it).");

static PyObject *
read_control(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *text, *kind_obj, *id = NULL, *seq = NULL, *empty = NULL, *result;
    Py_ssize_t len, at, id_start, id_end, digits;
    int kind;
    const void *data;
    Py_UCS4 c;
    long long ack_seq = 0;

    if (!check_nargs("read_control", nargs, 3)) {
        return NULL;
    }
    text = args[0];
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "text must be a str");
        return NULL;
    }
    kind = PyUnicode_KIND(text);
    data = PyUnicode_DATA(text);
    len = PyUnicode_GET_LENGTH(text);
    at = sizeof CONTROL_HEAD - 1;
    if (!has_at(kind, data, len, 0, CONTROL_HEAD, at) || at >= len) {
        Py_RETURN_NONE;
    }
    c = PyUnicode_READ(kind, data, at);
    if (c == '2') {
        kind_obj = args[1];
    }
    else if (c == '1') {
        kind_obj = args[2];
    }
    else {
        Py_RETURN_NONE;
    }
    at += 1;
    if (!has_at(kind, data, len, at, CONTROL_ID, sizeof CONTROL_ID - 1)) {
        Py_RETURN_NONE;
    }
    id_start = at += sizeof CONTROL_ID - 1;
    for (;; at++) {
        if (at >= len) {
            Py_RETURN_NONE;
        }
        c = PyUnicode_READ(kind, data, at);
        if (c == '"') {
            break;
        }
        if (c == '\\' || c < 0x20) {
            Py_RETURN_NONE;
        }
    }
    id_end = at;
    if (!has_at(kind, data, len, at, CONTROL_SEQ, sizeof CONTROL_SEQ - 1)) {
        Py_RETURN_NONE;
    }
    at += sizeof CONTROL_SEQ - 1;
    for (digits = 0; at < len; at++, digits++) {
        c = PyUnicode_READ(kind, data, at);
        if (c < '0' || c > '9') {
            break;
        }
        if (digits == 18 || (digits == 1 && ack_seq == 0)) {
            Py_RETURN_NONE; /* more than 18 digits, or a leading zero */
        }
        ack_seq = ack_seq * 10 + (long long)(c - '0');
    }
    if (digits == 0) {
        Py_RETURN_NONE;
    }
    if (!(at == len - 1 && PyUnicode_READ(kind, data, at) == '}')
        && !(len - at == (Py_ssize_t)(sizeof CONTROL_REST - 1)
             && has_at(kind, data, len, at, CONTROL_REST, sizeof CONTROL_REST - 1))) {
        Py_RETURN_NONE;
    }
    id = PyUnicode_Substring(text, id_start, id_end);
    seq = id == NULL ? NULL : PyLong_FromLongLong(ack_seq);
    empty = seq == NULL ? NULL : PyUnicode_FromStringAndSize(NULL, 0);
    if (empty == NULL) {
        Py_XDECREF(id);
        Py_XDECREF(seq);
        return NULL;
    }
    result = PyTuple_Pack(8, kind_obj, id, seq, empty, empty, empty, Py_None, empty);
    Py_DECREF(id);
    Py_DECREF(seq);
    Py_DECREF(empty);
    return result;
}

static PyMethodDef speedups_methods[] = {
    {"read_text", (PyCFunction)(void (*)(void))read_text, METH_FASTCALL, read_text_doc},
    {"frame_texts", (PyCFunction)(void (*)(void))frame_texts, METH_FASTCALL,
     frame_texts_doc},
    {"encode_frame", (PyCFunction)(void (*)(void))encode_frame, METH_FASTCALL,
     encode_frame_doc},
    {"read_control", (PyCFunction)(void (*)(void))read_control, METH_FASTCALL,
     read_control_doc},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot speedups_slots[] = {
    {0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "imkit._speedups",
    .m_doc = "The WebSocket framing and frame encoding of imkit's common case in C "
             "(optional; see imkit.core._framing and imkit.core.frames).",
    .m_size = 0,
    .m_methods = speedups_methods,
    .m_slots = speedups_slots,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&speedups_module);
}
