/*
 * imkit._speedups: the WebSocket framing of an open connection's common case, the JSON
 * text of the frames the server makes and reads, and the ack machines' common steps,
 * in C.
 *
 * Optional: imkit.core._framing holds the same two framing functions in Python,
 * imkit.core.frames the same encoder and reader, imkit.core.ack the same methods; they
 * use these only when this module was built (and IMKIT_NO_SPEEDUPS is not set). The two
 * must agree byte for byte, on every refusal and on every change of state:
 * tests/core/test_framing.py, tests/core/test_codec_speedups.py and
 * tests/core/test_ack_speedups.py compare them on generated input. No I/O, no clock:
 * functions of their arguments (the ack methods change the machine they are given), as
 * everything in the sans-IO core.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <limits.h>
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

static inline void
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

/* Whether any of the eight bytes of v is below 0x20, '"' or '\' (a character json
   escapes): each test is "some byte is below k" (k <= 0x80; "is zero" after an xor),
   exact for the word as a whole. */
#define BYTES(b) (0x0101010101010101ULL * (b))
static inline int
word_escapes(uint64_t v)
{
    uint64_t quote = v ^ BYTES('"'), backslash = v ^ BYTES('\\');
    uint64_t below = (v - BYTES(0x20)) & ~v;              /* a byte below 0x20 */
    uint64_t quoted = (quote - BYTES(1)) & ~quote;         /* a byte that is '"' */
    uint64_t escaped = (backslash - BYTES(1)) & ~backslash; /* a byte that is '\\' */

    return ((below | quoted | escaped) & BYTES(0x80)) != 0;
}

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
            uint64_t word;
            for (i = 0; i + 8 <= n; i += 8) { /* a word without escapes adds nothing */
                memcpy(&word, chars + i, 8);
                if (word_escapes(word)) {
                    for (Py_ssize_t j = i; j < i + 8; j++) {
                        size += EXTRA[chars[j]];
                    }
                }
            }
            for (; i < n; i++) {
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
        /* Runs without escapes are copied whole (found a word at a time). */
        const Py_UCS1 *chars = data;
        Py_UCS1 *dst = out->data;
        Py_ssize_t run = 0;
        uint64_t word;
        for (i = 0; i < n; i++) {
            while (i + 8 <= n) {
                memcpy(&word, chars + i, 8);
                if (word_escapes(word)) {
                    break;
                }
                i += 8;
            }
            if (i < n && EXTRA[chars[i]]) {
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
    if (kind == PyUnicode_1BYTE_KIND) {
        return memcmp((const Py_UCS1 *)data + at, lit, (size_t)n) == 0;
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

/*
 * read_frame: a frame's fields read off its JSON text, as imkit.core.frames reads them
 * with json (_decode_fields), for the JSON clients commonly write: objects, arrays,
 * strings (json's escapes; a surrogate escaped only in pairs), integers of at most 18
 * digits, true, false, null, at most MAX_DEPTH levels, whitespace between tokens.
 * Anything else (a float, a bigger int, NaN, a lone surrogate escape, a control character in
 * a string, a top-level key with an escape, text that is not JSON) and every envelope the
 * Python reader refuses or reads with a default of its own (a field of another type or
 * null, an unknown frameType, a negative ackSeq) is None: the Python reader reads it and
 * says what is wrong. The envelope's object is never built: its eight fields are kept as
 * they are read (a repeated key: the last one, as json's dict keeps), other keys' values
 * are read and dropped.
 */
typedef struct {
    PyObject *text;
    int kind;
    const void *data;
    Py_ssize_t len;
    Py_ssize_t pos;
} json_in;

/* A reader's answers: a new reference; NULL with an exception set (memory); or NULL
   with none: not for this reader (DECLINED). */
#define DECLINED NULL

static inline Py_UCS4
peek(const json_in *in)
{
    return in->pos < in->len ? PyUnicode_READ(in->kind, in->data, in->pos) : 0;
}

static inline void
skip_ws(json_in *in)
{
    while (in->pos < in->len) {
        Py_UCS4 c = PyUnicode_READ(in->kind, in->data, in->pos);
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') {
            return;
        }
        in->pos++;
    }
}

/* The value of the hex digit c, or -1. */
static int
hex_value(Py_UCS4 c)
{
    if (c >= '0' && c <= '9') {
        return (int)(c - '0');
    }
    if (c >= 'a' && c <= 'f') {
        return (int)(c - 'a' + 10);
    }
    if (c >= 'A' && c <= 'F') {
        return (int)(c - 'A' + 10);
    }
    return -1;
}

/* The code unit of the \uXXXX escape at text[at] (its backslash), or -1. */
static long
unit_at(const json_in *in, Py_ssize_t at)
{
    long value = 0;

    if (at + 6 > in->len || PyUnicode_READ(in->kind, in->data, at) != '\\'
        || PyUnicode_READ(in->kind, in->data, at + 1) != 'u') {
        return -1;
    }
    for (Py_ssize_t i = at + 2; i < at + 6; i++) {
        int digit = hex_value(PyUnicode_READ(in->kind, in->data, i));
        if (digit < 0) {
            return -1;
        }
        value = (value << 4) | digit;
    }
    return value;
}

/* The character an escape at text[at] (its backslash) stands for, and its length in
   *size: json's escapes, a surrogate pair (\ud83d\ude00, as json.dumps writes what is
   beyond the BMP) as one character. 0 (NUL itself comes back as NUL_CHAR) for an escape
   this reader leaves to json: an unknown one, a short or bad \u, a lone surrogate. */
#define NUL_CHAR 0x110000
static Py_UCS4
unescape(const json_in *in, Py_ssize_t at, Py_ssize_t *size)
{
    long high, low;

    if (at + 1 >= in->len) {
        return 0;
    }
    *size = 2;
    switch (PyUnicode_READ(in->kind, in->data, at + 1)) {
    case '"': return '"';
    case '\\': return '\\';
    case '/': return '/';
    case 'b': return '\b';
    case 'f': return '\f';
    case 'n': return '\n';
    case 'r': return '\r';
    case 't': return '\t';
    case 'u':
        high = unit_at(in, at);
        if (high < 0 || (high >= 0xDC00 && high <= 0xDFFF)) {
            return 0;
        }
        if (high < 0xD800 || high > 0xDBFF) {
            *size = 6;
            return high == 0 ? NUL_CHAR : (Py_UCS4)high;
        }
        low = unit_at(in, at + 6);
        if (low < 0xDC00 || low > 0xDFFF) {
            return 0;
        }
        *size = 12;
        return (Py_UCS4)(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00));
    default:
        return 0;
    }
}

/* The string whose opening quote is at in->pos. */
static PyObject *
read_string(json_in *in)
{
    Py_ssize_t start = in->pos + 1, at = start, count = 0, size;
    Py_UCS4 c, maxchar = 0;
    int escaped = 0;
    PyObject *result;

    if (in->kind == PyUnicode_1BYTE_KIND) { /* the common run: no quote, escape, control */
        const Py_UCS1 *chars = in->data;
        Py_ssize_t run = at;
        while (at < in->len && chars[at] != '"' && chars[at] != '\\' && chars[at] >= 0x20) {
            if (chars[at] > maxchar) {
                maxchar = chars[at];
            }
            at++;
        }
        count = at - run;
    }
    for (;; count++) {
        if (at >= in->len) {
            return DECLINED;
        }
        c = PyUnicode_READ(in->kind, in->data, at);
        if (c == '"') {
            break;
        }
        if (c < 0x20) {
            return DECLINED;
        }
        if (c == '\\') {
            c = unescape(in, at, &size);
            if (c == 0) {
                return DECLINED;
            }
            if (c == NUL_CHAR) {
                c = 0;
            }
            escaped = 1;
            at += size;
        }
        else {
            at++;
        }
        if (c > maxchar) {
            maxchar = c;
        }
    }
    in->pos = at + 1;
    if (!escaped) {
        return PyUnicode_Substring(in->text, start, at);
    }
    result = PyUnicode_New(count, maxchar);
    if (result == NULL) {
        return NULL;
    }
    {
        int out_kind = PyUnicode_KIND(result);
        void *out = PyUnicode_DATA(result);
        Py_ssize_t i = start, n = 0;
        while (n < count) {
            c = PyUnicode_READ(in->kind, in->data, i);
            if (c == '\\') {
                c = unescape(in, i, &size);
                if (c == NUL_CHAR) {
                    c = 0;
                }
                i += size;
            }
            else {
                i++;
            }
            PyUnicode_WRITE(out_kind, out, n++, c);
        }
    }
    return result;
}

/* An integer of at most 18 digits, at in->pos (a '-' or a digit). */
static PyObject *
read_int(json_in *in)
{
    long long value = 0;
    int negative = 0, digits = 0;
    Py_UCS4 c = peek(in);

    if (c == '-') {
        negative = 1;
        in->pos++;
    }
    for (; in->pos < in->len; in->pos++, digits++) {
        c = PyUnicode_READ(in->kind, in->data, in->pos);
        if (c < '0' || c > '9') {
            break;
        }
        if (digits == 18 || (digits == 1 && value == 0)) {
            return DECLINED; /* more than 18 digits, or a leading zero */
        }
        value = value * 10 + (long long)(c - '0');
    }
    c = peek(in);
    if (digits == 0 || c == '.' || c == 'e' || c == 'E') {
        return DECLINED; /* not a number here, or a float: json reads it */
    }
    return PyLong_FromLongLong(negative ? -value : value);
}

static PyObject *read_value(json_in *in, int depth);

/* At an object's or array's opening bracket: past it and the whitespace after it; 1 if
   it is empty (its closing bracket, close, read too), else 0. */
static int
open_container(json_in *in, Py_UCS4 close)
{
    in->pos++;
    skip_ws(in);
    if (peek(in) == close) {
        in->pos++;
        return 1;
    }
    return 0;
}

/* After a member of an object or array: 1 if another follows (the ',' read), 0 if that
   was the last (the closing bracket, close, read), -1 if neither (not for this reader). */
static int
next_member(json_in *in, Py_UCS4 close)
{
    skip_ws(in);
    if (peek(in) == ',') {
        in->pos++;
        skip_ws(in);
        return 1;
    }
    if (peek(in) == close) {
        in->pos++;
        return 0;
    }
    return -1;
}

static PyObject *
read_array(json_in *in, int depth)
{
    PyObject *list = PyList_New(0), *item;
    int more;

    if (list == NULL || open_container(in, ']')) {
        return list;
    }
    do {
        item = read_value(in, depth + 1);
        if (item == NULL || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(item);
    } while ((more = next_member(in, ']')) == 1);
    if (more < 0) {
        Py_DECREF(list);
        return DECLINED;
    }
    return list;
}

/* The object at in->pos, as a dict (a repeated key: the last value, as json's). */
static PyObject *
read_object(json_in *in, int depth)
{
    PyObject *dict = PyDict_New(), *key, *value;
    int more;

    if (dict == NULL || open_container(in, '}')) {
        return dict;
    }
    do {
        if (peek(in) != '"' || (key = read_string(in)) == NULL) {
            Py_DECREF(dict);
            return NULL;
        }
        skip_ws(in);
        value = NULL;
        if (peek(in) == ':') {
            in->pos++;
            skip_ws(in);
            value = read_value(in, depth + 1);
        }
        if (value == NULL || PyDict_SetItem(dict, key, value) < 0) {
            Py_DECREF(key);
            Py_XDECREF(value);
            Py_DECREF(dict);
            return NULL;
        }
        Py_DECREF(key);
        Py_DECREF(value);
    } while ((more = next_member(in, '}')) == 1);
    if (more < 0) {
        Py_DECREF(dict);
        return DECLINED;
    }
    return dict;
}

static PyObject *
read_value(json_in *in, int depth)
{
    Py_UCS4 c;

    if (depth > MAX_DEPTH) {
        return DECLINED;
    }
    c = peek(in);
    if (c == '"') {
        return read_string(in);
    }
    if (c == '{') {
        return read_object(in, depth);
    }
    if (c == '[') {
        return read_array(in, depth);
    }
    if (c == '-' || (c >= '0' && c <= '9')) {
        return read_int(in);
    }
    if (has_at(in->kind, in->data, in->len, in->pos, "true", 4)) {
        in->pos += 4;
        Py_RETURN_TRUE;
    }
    if (has_at(in->kind, in->data, in->len, in->pos, "false", 5)) {
        in->pos += 5;
        Py_RETURN_FALSE;
    }
    if (has_at(in->kind, in->data, in->len, in->pos, "null", 4)) {
        in->pos += 4;
        Py_RETURN_NONE;
    }
    return DECLINED;
}

/* The envelope's fields, in the order of Frame's (and of FIELD_NAMES). */
#define FIELD_COUNT 8
static const char *const FIELD_NAMES[FIELD_COUNT] = {
    "frameType", "id", "ackSeq", "method", "formId", "transpondUid", "data", "replyTo",
};
static const Py_ssize_t FIELD_LENGTHS[FIELD_COUNT] = {9, 2, 6, 6, 6, 12, 4, 7};
enum { F_TYPE, F_ID, F_SEQ, F_METHOD, F_FORM, F_TRANSPOND, F_DATA, F_REPLY };

/* The field a top-level key written without escapes names (its characters at
   text[at:at+n]), or -1. */
static int
field_named(const json_in *in, Py_ssize_t at, Py_ssize_t n)
{
    for (int i = 0; i < FIELD_COUNT; i++) {
        if (FIELD_LENGTHS[i] == n
            && has_at(in->kind, in->data, in->len, at, FIELD_NAMES[i], n)) {
            return i;
        }
    }
    return -1;
}

/* The envelope object at in->pos, its eight fields kept in fields (new references); 0 if
   it is not for this reader (or memory ran out: an exception is set then). */
static int
read_envelope(json_in *in, PyObject **fields)
{
    Py_ssize_t at;
    Py_UCS4 c;
    PyObject *value;
    int field, more;

    if (open_container(in, '}')) {
        return 1;
    }
    do {
        if (peek(in) != '"') {
            return 0;
        }
        for (at = in->pos + 1;; at++) {
            if (at >= in->len) {
                return 0;
            }
            c = PyUnicode_READ(in->kind, in->data, at);
            if (c == '"') {
                break;
            }
            if (c == '\\' || c < 0x20) {
                return 0; /* an escape in a top-level key: json reads it */
            }
        }
        field = field_named(in, in->pos + 1, at - in->pos - 1);
        in->pos = at + 1;
        skip_ws(in);
        if (peek(in) != ':') {
            return 0;
        }
        in->pos++;
        skip_ws(in);
        value = read_value(in, 1);
        if (value == NULL) {
            return 0;
        }
        if (field < 0) {
            Py_DECREF(value); /* a key the reader does not look at */
        }
        else {
            Py_XSETREF(fields[field], value); /* a repeated key: the last one */
        }
    } while ((more = next_member(in, '}')) == 1);
    return more == 0;
}

PyDoc_STRVAR(read_frame_doc,
"read_frame(text, data_form_id, types, form_types, /)\n--\n\n"
"The fields of the frame whose JSON text is text, as imkit.core.frames._decode_fields\n"
"reads them: (types[frameType], id, ackSeq, method, formId, transpondUid, data,\n"
"replyTo), formId being data_form_id for a frameType whose bit is set in form_types\n"
"(unless data_form_id is None). None for a text this reader leaves to json (see the\n"
"source), or whose envelope json's reader refuses or reads otherwise.");

static PyObject *
read_frame(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *fields[FIELD_COUNT] = {NULL}, *result = NULL, *types, *known, *form_id;
    json_in in;
    long long frame_type = 0, form_types;
    int i;

    if (!check_nargs("read_frame", nargs, 4)) {
        return NULL;
    }
    types = args[2];
    if (!PyUnicode_Check(args[0]) || !PyTuple_Check(types) || !PyLong_Check(args[3])
        || (args[1] != Py_None && !PyUnicode_Check(args[1]))) {
        PyErr_SetString(PyExc_TypeError,
                        "read_frame() takes (str, str or None, tuple, int)");
        return NULL;
    }
    form_types = PyLong_AsLongLong(args[3]);
    if (form_types == -1 && PyErr_Occurred()) {
        return NULL;
    }
    in.text = args[0];
    in.kind = PyUnicode_KIND(in.text);
    in.data = PyUnicode_DATA(in.text);
    in.len = PyUnicode_GET_LENGTH(in.text);
    in.pos = 0;
    skip_ws(&in);
    if (peek(&in) != '{' || !read_envelope(&in, fields)) {
        goto done;
    }
    skip_ws(&in);
    if (in.pos != in.len) {
        goto done; /* more after the object */
    }
    /* Each field absent or of its type: exact int for frameType and ackSeq, exact str
       for the others (data: anything). */
    for (i = 0; i < FIELD_COUNT; i++) {
        PyObject *value = fields[i];
        if (value == NULL || i == F_DATA) {
            continue;
        }
        if (i == F_TYPE || i == F_SEQ ? !PyLong_CheckExact(value) : !PyUnicode_CheckExact(value)) {
            goto done;
        }
    }
    if (fields[F_TYPE] != NULL) {
        int overflow;
        frame_type = PyLong_AsLongLongAndOverflow(fields[F_TYPE], &overflow);
        if (overflow) {
            goto done;
        }
    }
    if (frame_type < 0 || frame_type >= PyTuple_GET_SIZE(types)
        || PyTuple_GET_ITEM(types, frame_type) == Py_None) {
        goto done; /* an unknown frameType */
    }
    known = PyTuple_GET_ITEM(types, frame_type);
    if (fields[F_SEQ] != NULL && PyLong_AsLongLong(fields[F_SEQ]) < 0) {
        goto done; /* a negative ackSeq (read_int made it: it fits) */
    }
    form_id = fields[F_FORM];
    if (args[1] != Py_None && frame_type < 63 && (form_types >> frame_type) & 1) {
        form_id = args[1];
    }
    {
        PyObject *empty = PyUnicode_FromStringAndSize(NULL, 0), *zero = PyLong_FromLong(0);
        if (empty == NULL || zero == NULL) {
            Py_XDECREF(empty);
            Py_XDECREF(zero);
            goto done;
        }
#define OR(v, d) ((v) != NULL ? (v) : (d))
        result = PyTuple_Pack(8, known, OR(fields[F_ID], empty), OR(fields[F_SEQ], zero),
                              OR(fields[F_METHOD], empty), OR(form_id, empty),
                              OR(fields[F_TRANSPOND], empty), OR(fields[F_DATA], Py_None),
                              OR(fields[F_REPLY], empty));
#undef OR
        Py_DECREF(empty);
        Py_DECREF(zero);
    }
done:
    for (i = 0; i < FIELD_COUNT; i++) {
        Py_XDECREF(fields[i]);
    }
    if (result == NULL && !PyErr_Occurred()) {
        Py_RETURN_NONE;
    }
    return result;
}

PyDoc_STRVAR(read_fields_doc,
"read_fields(text, data_form_id, types, form_types, ack, ping, /)\n--\n\n"
"read_control(text, ack, ping) when the text's 14th character is a control frame's\n"
"type ('1' or '2') and it takes the text, else read_frame(text, data_form_id, types,\n"
"form_types): the C readings of imkit.core.frames._decode_fields in one call. None for\n"
"a text neither takes (not a str included): the Python reader reads it.");

static PyObject *
read_fields(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *text, *control, *frame_args[4];

    if (!check_nargs("read_fields", nargs, 6)) {
        return NULL;
    }
    text = args[0];
    if (!PyUnicode_CheckExact(text)) {
        Py_RETURN_NONE;
    }
    if (PyUnicode_GET_LENGTH(text) > 13) {
        Py_UCS4 c = PyUnicode_READ_CHAR(text, 13);
        if (c == '1' || c == '2') {
            PyObject *control_args[3];
            control_args[0] = text;
            control_args[1] = args[4];
            control_args[2] = args[5];
            control = read_control(module, control_args, 3);
            if (control != Py_None) {
                return control; /* the fields, or NULL with the error set */
            }
            Py_DECREF(control);
        }
    }
    frame_args[0] = text;
    frame_args[1] = args[1];
    frame_args[2] = args[2];
    frame_args[3] = args[3];
    return read_frame(module, frame_args, 4);
}

/*
 * slot_maker(cls, slots): a callable that makes an instance of cls (a class with
 * __slots__, such as the frozen attrs classes Frame and the core's events) with the given
 * slots set to its positional arguments, in one call: what object.__new__ and each slot
 * descriptor's __set__ do (imkit.core.frames.py_new_frame in Python), without a call per
 * slot. The slots' offsets come from their member descriptors, checked when the maker is
 * made.
 */
#ifdef Py_T_OBJECT_EX
#define SLOT_TYPE Py_T_OBJECT_EX
#else
#define SLOT_TYPE T_OBJECT_EX
#endif
#define MAX_SLOTS 8

/* The offsets of the object slots named by the n member descriptors in the tuple slots,
   each one of cls's own (not read-only, within the instance); 0 with TypeError (naming
   the function `who`) otherwise. */
static int
member_offsets(const char *who, PyObject *cls, PyObject *slots, Py_ssize_t n,
               Py_ssize_t *offsets)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *slot = PyTuple_GET_ITEM(slots, i);
        PyMemberDef *member;
        if (!Py_IS_TYPE(slot, &PyMemberDescr_Type)
            || ((PyDescrObject *)slot)->d_type != (PyTypeObject *)cls) {
            PyErr_Format(PyExc_TypeError, "%s(): each slot must be one of the class's own",
                         who);
            return 0;
        }
        member = ((PyMemberDescrObject *)slot)->d_member;
        if (member->type != SLOT_TYPE || (member->flags & READONLY)
            || member->offset < (Py_ssize_t)sizeof(PyObject)
            || member->offset + (Py_ssize_t)sizeof(PyObject *)
                   > ((PyTypeObject *)cls)->tp_basicsize) {
            PyErr_Format(PyExc_TypeError, "%s(): each slot must hold an object", who);
            return 0;
        }
        offsets[i] = member->offset;
    }
    return 1;
}

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyTypeObject *cls;
    Py_ssize_t count;
    Py_ssize_t offsets[MAX_SLOTS];
} SlotMaker;

static PyObject *
maker_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    SlotMaker *maker = (SlotMaker *)self;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *made;

    if (nargs != maker->count || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_Format(PyExc_TypeError, "a maker of %s takes %zd positional arguments",
                     maker->cls->tp_name, maker->count);
        return NULL;
    }
    made = maker->cls->tp_alloc(maker->cls, 0);
    if (made == NULL) {
        return NULL;
    }
    /* (Nothing is allocated from here on: the slots are set before anyone sees them.) */
    for (Py_ssize_t i = 0; i < nargs; i++) {
        *(PyObject **)((char *)made + maker->offsets[i]) = Py_NewRef(args[i]);
    }
    return made;
}

static void
maker_dealloc(PyObject *self)
{
    Py_XDECREF(((SlotMaker *)self)->cls);
    Py_TYPE(self)->tp_free(self);
}

static PyTypeObject SlotMakerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "imkit._speedups.SlotMaker",
    .tp_basicsize = sizeof(SlotMaker),
    .tp_dealloc = maker_dealloc,
    .tp_vectorcall_offset = offsetof(SlotMaker, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Makes instances of one class with its slots set (see slot_maker).",
};

PyDoc_STRVAR(slot_maker_doc,
"slot_maker(cls, slots, /)\n--\n\n"
"A callable that makes an instance of cls with the slots whose member descriptors slots\n"
"holds (1 to 8, in the order of its positional arguments) set to its arguments; the\n"
"others are left unset. Raises TypeError unless each is an object slot of cls.");

static PyObject *
slot_maker(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *cls, *slots;
    SlotMaker *maker;
    Py_ssize_t count;

    if (!check_nargs("slot_maker", nargs, 2)) {
        return NULL;
    }
    cls = args[0];
    slots = args[1];
    count = PyTuple_Check(slots) ? PyTuple_GET_SIZE(slots) : 0;
    if (!PyType_Check(cls) || count < 1 || count > MAX_SLOTS) {
        PyErr_SetString(PyExc_TypeError, "slot_maker() takes a class and a tuple of 1 to 8 slots");
        return NULL;
    }
    maker = PyObject_New(SlotMaker, &SlotMakerType);
    if (maker == NULL) {
        return NULL;
    }
    maker->vectorcall = maker_call;
    maker->cls = NULL;
    maker->count = count;
    if (!member_offsets("slot_maker", cls, slots, count, maker->offsets)) {
        Py_DECREF(maker);
        return NULL;
    }
    maker->cls = (PyTypeObject *)Py_NewRef(cls);
    return (PyObject *)maker;
}

/* ------------------------------------------------------------------ plain_append */

/* Whether v is an exact str, non-empty unless allowed, ASCII, and (when no_nul) without
   NUL: the common case of an id or a text (imkit.chat.store.check_append). */
static int
plain_ascii(PyObject *v, int allow_empty, int no_nul)
{
    if (!PyUnicode_CheckExact(v) || !PyUnicode_IS_ASCII(v)) {
        return 0;
    }
    Py_ssize_t size = PyUnicode_GET_LENGTH(v);
    if (size == 0) {
        return allow_empty;
    }
    return !no_nul || memchr(PyUnicode_DATA(v), 0, (size_t)size) == NULL;
}

/* Whether v is an exact int within [lo, hi]. */
static int
plain_range(PyObject *v, long long lo, long long hi)
{
    if (!PyLong_CheckExact(v)) {
        return 0;
    }
    int overflow = 0;
    long long value = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow != 0 || (value == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    return lo <= value && value <= hi;
}

PyDoc_STRVAR(plain_append_doc,
"plain_append(conversation_id, sender_id, recv_id, msg_id, chat_type, m_type, content,\n"
"             send_time, /)\n"
"--\n\n"
"True when the arguments of MessageStore.append are of the common, valid kind, as\n"
"imkit.chat.store's _py_plain_append answers: the four ids exact, non-empty, ASCII\n"
"str without NUL, content an exact ASCII str, chat_type and m_type exact 32-bit ints,\n"
"send_time an exact 64-bit int. False otherwise (the Python checks then say what is\n"
"wrong, or accept what is valid but not of this kind).");

static PyObject *
plain_append(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "plain_append() takes 8 arguments");
        return NULL;
    }
    int plain = plain_ascii(args[0], 0, 1) && plain_ascii(args[1], 0, 1)
                && plain_ascii(args[2], 0, 1) && plain_ascii(args[3], 0, 1)
                && plain_range(args[4], INT32_MIN, INT32_MAX)
                && plain_range(args[5], INT32_MIN, INT32_MAX)
                && plain_ascii(args[6], 1, 0) && plain_range(args[7], LLONG_MIN, LLONG_MAX);
    return Py_NewRef(plain ? Py_True : Py_False);
}

/* ------------------------------------------------------------------ ack_methods */

/*
 * ack_methods(...): the common case of four methods of imkit.core.ack's machines in C,
 * installed as those methods (method descriptors: self comes first):
 *
 *   _apply(frame, state, event, now[, entry])  one transition of the table, carried out on
 *       the machine's live ids, remembered ids and heap of deadlines (_Machine);
 *   _data(frame, now, acked)   an acked Data frame for an id not in flight (Receiver);
 *   _on_id(message_id, event, now)   an ack or a confirmation of an id in flight;
 *   _send(frame, now)          a new message with room in the window (Sender).
 *
 * They read and write the machines' state through the slots of the Python classes, and
 * hand every other case, before changing anything, to the Python method each replaces:
 * a pair missing from the table (which raises there), an id remembered again, a memory
 * due for pruning, a heap due for compaction, a backlog, a rate limit's pacing, an id in
 * use, any argument or slot not holding what the Python code puts there. So the Python
 * methods stay the one definition of the rules; tests/core/test_ack_speedups.py holds the
 * two to each other on generated inputs.
 */
enum {
    M_STEPS, M_LIVE, M_MEMORY, M_HEAP, M_TOKENS, M_COMPACT_AT, M_RESEND, M_TIMEOUT, M_WINDOW,
    M_MODE, M_COUNT
};
enum { S_BACKLOG, S_BACKLOG_IDS, S_RETRY_SLOT, S_COUNT };
enum { E_FRAME, E_STATE, E_GIVE_UP_AT, E_TOKEN, E_COUNT };
enum { Y_MAX, Y_REMEMBER_FOR, Y_HEAD, Y_COUNT };
enum { C_NEW, C_DONE, C_SEND, C_DATA, C_NO_ACK, C_COUNT };
enum { A_APPLY, A_DATA, A_ON_ID, A_SEND, A_COUNT };

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    int kind;             /* A_APPLY ... A_SEND */
    PyTypeObject *machine_cls;
    PyTypeObject *sender_cls;
    PyTypeObject *entry_cls;
    PyTypeObject *memory_cls;
    PyObject *constants[C_COUNT]; /* State.NEW, State.DONE, Input.SEND, Input.DATA,
                                     AckMode.NONE */
    PyObject *heappush;
    PyObject *py_method;  /* the Python method: every case but the common one */
    PyObject *id_name;    /* "id", the frame's attribute */
    PyObject *popitem_name;
    Py_ssize_t machine[M_COUNT];
    Py_ssize_t sender[S_COUNT];
    Py_ssize_t entry[E_COUNT];
    Py_ssize_t memory[Y_COUNT];
} AckMethod;

#define SLOT(obj, offset) (*(PyObject **)((char *)(obj) + (offset)))
#define FELL ((PyObject *)1) /* apply_core's "not the common case": nothing was changed */

/* The float in slot `offset` of obj, or -1 with *ok = 0 when it holds no exact float. */
static double
slot_double(PyObject *obj, Py_ssize_t offset, int *ok)
{
    PyObject *v = SLOT(obj, offset);
    if (v == NULL || !PyFloat_CheckExact(v)) {
        *ok = 0;
        return -1.0;
    }
    return PyFloat_AS_DOUBLE(v);
}

/* The int in slot `offset` of obj, or -1 with *ok = 0 unless it holds an exact int that
   fits a long long. */
static long long
slot_long(PyObject *obj, Py_ssize_t offset, int *ok)
{
    PyObject *v = SLOT(obj, offset);
    if (v == NULL || !PyLong_CheckExact(v)) {
        *ok = 0;
        return -1;
    }
    int overflow = 0;
    long long value = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow != 0 || (value == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        *ok = 0;
        return -1;
    }
    return value;
}

/* Set slot `offset` of obj to value (a new reference, stolen); -1 if value is NULL. */
static int
set_slot(PyObject *obj, Py_ssize_t offset, PyObject *value)
{
    if (value == NULL) {
        return -1;
    }
    Py_XSETREF(SLOT(obj, offset), value);
    return 0;
}

/* Over the memory's bound: forget its oldest id (popitem(last=False)); the next one's
   expiry is the new head. */
static int
forget_oldest(AckMethod *am, PyObject *memory)
{
    PyObject *popitem_args[2] = {memory, Py_False};
    PyObject *popped = PyObject_VectorcallMethod(am->popitem_name, popitem_args,
                                                 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (popped == NULL) {
        return -1;
    }
    Py_DECREF(popped);
    PyObject *keys = PyObject_GetIter(memory);
    if (keys == NULL) {
        return -1;
    }
    PyObject *first = PyIter_Next(keys);
    Py_DECREF(keys);
    if (first == NULL) {
        return PyErr_Occurred() ? -1 : 0; /* (never empty here: size > most >= 1) */
    }
    PyObject *head = PyObject_GetItem(memory, first);
    Py_DECREF(first);
    return set_slot(memory, am->memory[Y_HEAD], head);
}

/* The machine's dict / object in slot `which`, borrowed, or NULL when it holds none of
   the kind the Python code puts there. */
static PyObject *
machine_dict(AckMethod *am, PyObject *self, int which)
{
    PyObject *v = SLOT(self, am->machine[which]);
    return v != NULL && PyDict_CheckExact(v) ? v : NULL;
}

static PyObject *
machine_memory(AckMethod *am, PyObject *self)
{
    PyObject *v = SLOT(self, am->machine[M_MEMORY]);
    return v != NULL && PyObject_TypeCheck(v, am->memory_cls) ? v : NULL;
}

/* The resend heap's item (when, token, message_id), as _Machine._schedule pushes it (a
   new reference; NULL with an error set). */
static PyObject *
heap_item(double when, long long token, PyObject *message_id)
{
    PyObject *w = PyFloat_FromDouble(when);
    PyObject *t = w == NULL ? NULL : PyLong_FromLongLong(token);
    PyObject *item = t == NULL ? NULL : PyTuple_Pack(3, w, t, message_id);
    Py_XDECREF(w);
    Py_XDECREF(t);
    return item;
}

/* _Machine._py_apply's common case: the actions (a new reference); FELL when it is not
   the common case (nothing changed); NULL with an error set. message_id is frame.id (an
   exact str); entry is its live entry or Py_None. */
static PyObject *
apply_core(AckMethod *am, PyObject *self, PyObject *frame, PyObject *message_id,
           PyObject *state, PyObject *event, double now, PyObject *entry)
{
    PyObject *steps = machine_dict(am, self, M_STEPS);
    PyObject *live = machine_dict(am, self, M_LIVE);
    PyObject *memory = machine_memory(am, self);
    PyObject *heap = SLOT(self, am->machine[M_HEAP]);
    PyObject *key, *step, *actions, *new_state;
    int ok = 1;

    if (steps == NULL || live == NULL || memory == NULL || heap == NULL
        || !PyList_CheckExact(heap)
        || (entry != Py_None && !Py_IS_TYPE(entry, am->entry_cls))) {
        return FELL;
    }
    key = PyTuple_Pack(2, state, event);
    if (key == NULL) {
        return NULL;
    }
    step = PyDict_GetItemWithError(steps, key); /* borrowed */
    Py_DECREF(key);
    if (step == NULL) {
        return PyErr_Occurred() ? NULL : FELL; /* not in the table: the Python method raises */
    }
    if (!PyTuple_CheckExact(step) || PyTuple_GET_SIZE(step) != 2) {
        return FELL;
    }
    actions = PyTuple_GET_ITEM(step, 0);
    new_state = PyTuple_GET_ITEM(step, 1);
    {
        /* Pruning is due (the memory's oldest id expired): the Python method prunes. */
        double head = slot_double(memory, am->memory[Y_HEAD], &ok);
        if (!ok || head <= now) {
            return FELL;
        }
    }
    if (new_state == am->constants[C_NEW] || new_state == am->constants[C_DONE]) {
        int remember = new_state == am->constants[C_DONE] && PyUnicode_GET_LENGTH(message_id) > 0;
        double remember_for = 0.0;
        long long most = 0;
        if (remember) {
            most = slot_long(memory, am->memory[Y_MAX], &ok);
            remember_for = slot_double(memory, am->memory[Y_REMEMBER_FOR], &ok);
            if (!ok || most < 1 || !(now + remember_for > now)) {
                return FELL; /* (an expiry not after now: pruned at once, in Python) */
            }
            int known = PyDict_Contains(memory, message_id);
            if (known < 0) {
                return NULL;
            }
            if (known) {
                return FELL; /* remembered again (it moves): Python's */
            }
        }
        if (entry != Py_None) { /* an id without an entry is not live: nothing to drop */
            if (set_slot(entry, am->entry[E_TOKEN], PyLong_FromLong(-1)) < 0) {
                return NULL;
            }
            if (PyDict_DelItem(live, message_id) < 0) {
                if (!PyErr_ExceptionMatches(PyExc_KeyError)) {
                    return NULL;
                }
                PyErr_Clear();
            }
        }
        if (remember) {
            PyObject *expiry = PyFloat_FromDouble(now + remember_for);
            if (expiry == NULL) {
                return NULL;
            }
            if (PyObject_SetItem(memory, message_id, expiry) < 0) {
                Py_DECREF(expiry);
                return NULL;
            }
            Py_ssize_t size = PyDict_GET_SIZE(memory);
            if (size == 1) {
                Py_SETREF(SLOT(memory, am->memory[Y_HEAD]), expiry);
            }
            else {
                Py_DECREF(expiry);
                if (size > most && forget_oldest(am, memory) < 0) {
                    return NULL;
                }
            }
        }
    }
    else {
        PyObject *item, *pushed;
        long long tokens = slot_long(self, am->machine[M_TOKENS], &ok);
        long long compact_at = slot_long(self, am->machine[M_COMPACT_AT], &ok);
        double resend = slot_double(self, am->machine[M_RESEND], &ok);
        double timeout = slot_double(self, am->machine[M_TIMEOUT], &ok);
        double give_up_at, when;
        if (!ok || PyList_GET_SIZE(heap) >= compact_at || tokens >= LLONG_MAX - 1) {
            return FELL; /* the heap is compacted first, by the Python method */
        }
        if (entry == Py_None) {
            entry = am->entry_cls->tp_alloc(am->entry_cls, 0);
            if (entry == NULL) {
                return NULL;
            }
            give_up_at = now + timeout;
            SLOT(entry, am->entry[E_FRAME]) = Py_NewRef(frame);
            SLOT(entry, am->entry[E_STATE]) = Py_NewRef(new_state);
            SLOT(entry, am->entry[E_GIVE_UP_AT]) = PyFloat_FromDouble(give_up_at);
            if (SLOT(entry, am->entry[E_GIVE_UP_AT]) == NULL) {
                Py_DECREF(entry);
                return NULL;
            }
        }
        else {
            give_up_at = slot_double(entry, am->entry[E_GIVE_UP_AT], &ok);
            if (!ok) {
                return FELL;
            }
            Py_INCREF(entry);
            Py_XSETREF(SLOT(entry, am->entry[E_STATE]), Py_NewRef(new_state));
        }
        /* self._live[id] = entry, then self._schedule(entry, now) */
        if (PyDict_SetItem(live, message_id, entry) < 0) {
            Py_DECREF(entry);
            return NULL;
        }
        tokens += 1;
        if (set_slot(self, am->machine[M_TOKENS], PyLong_FromLongLong(tokens)) < 0
            || set_slot(entry, am->entry[E_TOKEN], PyLong_FromLongLong(tokens)) < 0) {
            Py_DECREF(entry);
            return NULL;
        }
        Py_DECREF(entry);
        when = now + resend;
        if (give_up_at < when) {
            when = give_up_at;
        }
        item = heap_item(when, tokens, message_id);
        if (item == NULL) {
            return NULL;
        }
        PyObject *push_args[2] = {heap, item};
        pushed = PyObject_Vectorcall(am->heappush, push_args, 2, NULL);
        Py_DECREF(item);
        if (pushed == NULL) {
            return NULL;
        }
        Py_DECREF(pushed);
    }
    return Py_NewRef(actions);
}

/* frame.id when it is an exact str (a new reference); FELL otherwise; NULL on error. */
static PyObject *
frame_id(AckMethod *am, PyObject *frame)
{
    PyObject *message_id = PyObject_GetAttr(frame, am->id_name);
    if (message_id != NULL && !PyUnicode_CheckExact(message_id)) {
        Py_DECREF(message_id);
        return FELL;
    }
    return message_id;
}

/* (frame, actions) for the actions apply_core gave (stolen); FELL and NULL pass on. */
static PyObject *
acts(PyObject *frame, PyObject *actions)
{
    if (actions == NULL || actions == FELL) {
        return actions;
    }
    PyObject *pair = PyTuple_Pack(2, frame, actions);
    Py_DECREF(actions);
    return pair;
}

/* _apply(self, frame, state, event, now[, entry]) */
static PyObject *
method_apply(AckMethod *am, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 5 || nargs > 6 || !PyFloat_CheckExact(args[4])) {
        return FELL;
    }
    PyObject *message_id = frame_id(am, args[1]);
    if (message_id == NULL || message_id == FELL) {
        return message_id;
    }
    PyObject *result = apply_core(am, args[0], args[1], message_id, args[2], args[3],
                                  PyFloat_AS_DOUBLE(args[4]), nargs == 6 ? args[5] : Py_None);
    Py_DECREF(message_id);
    return result;
}

/* Receiver._data(self, frame, now, acked): an acked frame for an id not in flight. */
static PyObject *
method_data(AckMethod *am, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *self, *frame, *live, *memory, *message_id, *result;
    int known;

    if (nargs != 4 || !PyFloat_CheckExact(args[2]) || args[3] != Py_True) {
        return FELL;
    }
    self = args[0];
    frame = args[1];
    live = machine_dict(am, self, M_LIVE);
    memory = machine_memory(am, self);
    if (live == NULL || memory == NULL) {
        return FELL;
    }
    message_id = frame_id(am, frame);
    if (message_id == NULL || message_id == FELL) {
        return message_id;
    }
    known = PyDict_Contains(live, message_id);
    if (known == 0) {
        known = PyDict_Contains(memory, message_id);
        if (known >= 0) {
            PyObject *state = am->constants[known ? C_DONE : C_NEW];
            result = acts(frame, apply_core(am, self, frame, message_id, state,
                                            am->constants[C_DATA], PyFloat_AS_DOUBLE(args[2]),
                                            Py_None));
            Py_DECREF(message_id);
            return result;
        }
    }
    Py_DECREF(message_id);
    return known < 0 ? NULL : FELL; /* in flight (RigorAck's wait): Python's */
}

/* _Machine._on_id(self, message_id, event, now): an id in flight. */
static PyObject *
method_on_id(AckMethod *am, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *live, *entry, *frame, *state, *result, *message_id;

    if (nargs != 4 || !PyUnicode_CheckExact(args[1]) || !PyFloat_CheckExact(args[3])) {
        return FELL;
    }
    live = machine_dict(am, args[0], M_LIVE);
    if (live == NULL) {
        return FELL;
    }
    entry = PyDict_GetItemWithError(live, args[1]); /* borrowed */
    if (entry == NULL) {
        return PyErr_Occurred() ? NULL : FELL; /* not in flight: a stub frame, in Python */
    }
    if (!Py_IS_TYPE(entry, am->entry_cls)) {
        return FELL;
    }
    frame = SLOT(entry, am->entry[E_FRAME]);
    state = SLOT(entry, am->entry[E_STATE]);
    if (frame == NULL || state == NULL) {
        return FELL;
    }
    Py_INCREF(entry);
    Py_INCREF(frame);
    Py_INCREF(state);
    message_id = frame_id(am, frame);
    if (message_id == NULL || message_id == FELL) {
        result = message_id;
    }
    else {
        /* (The live key is the frame's id: the Python method applies to the frame's.) */
        result = acts(frame, apply_core(am, args[0], frame, message_id, state, args[2],
                                        PyFloat_AS_DOUBLE(args[3]), entry));
        Py_DECREF(message_id);
    }
    Py_DECREF(state);
    Py_DECREF(frame);
    Py_DECREF(entry);
    return result;
}

/* Sender._send(self, frame, now): a new acked message with room in the window. */
static PyObject *
method_send(AckMethod *am, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *self, *frame, *live, *memory, *message_id, *backlog, *backlog_ids, *mode;
    PyObject *result = FELL;
    double now, retry_slot;
    long long window;
    int ok = 1, known;

    if (nargs != 3 || !PyFloat_CheckExact(args[2]) || !PyObject_TypeCheck(args[0], am->sender_cls)) {
        return FELL;
    }
    self = args[0];
    frame = args[1];
    now = PyFloat_AS_DOUBLE(args[2]);
    live = machine_dict(am, self, M_LIVE);
    memory = machine_memory(am, self);
    mode = SLOT(self, am->machine[M_MODE]);
    backlog = SLOT(self, am->sender[S_BACKLOG]);
    backlog_ids = SLOT(self, am->sender[S_BACKLOG_IDS]);
    window = slot_long(self, am->machine[M_WINDOW], &ok);
    retry_slot = slot_double(self, am->sender[S_RETRY_SLOT], &ok);
    /* NoAck, a full window, the rate limit's pacing: Python's. */
    if (!ok || live == NULL || memory == NULL || mode == NULL || mode == am->constants[C_NO_ACK]
        || PyDict_GET_SIZE(live) >= window || !(now >= retry_slot)
        || (backlog_ids != Py_None && !PyAnySet_CheckExact(backlog_ids))) {
        return FELL;
    }
    if (backlog != Py_None) { /* messages waiting: Python's (an empty backlog is none) */
        Py_ssize_t waiting = PyObject_Size(backlog);
        if (waiting != 0) {
            return waiting < 0 ? NULL : FELL;
        }
    }
    message_id = frame_id(am, frame);
    if (message_id == NULL || message_id == FELL) {
        return message_id;
    }
    /* An empty id or one in use (or queued) is refused by the Python method. */
    if (PyUnicode_GET_LENGTH(message_id) > 0) {
        known = PyDict_Contains(live, message_id);
        if (known == 0) {
            known = PyDict_Contains(memory, message_id);
        }
        if (known == 0 && backlog_ids != Py_None) {
            known = PySet_Contains(backlog_ids, message_id);
        }
        if (known < 0) {
            result = NULL;
        }
        else if (!known) {
            result = apply_core(am, self, frame, message_id, am->constants[C_NEW],
                                am->constants[C_SEND], now, Py_None);
        }
    }
    Py_DECREF(message_id);
    return result;
}

static PyObject *
ack_method_call(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    AckMethod *am = (AckMethod *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *result = FELL;

    /* Positional, self a machine, as the Python callers call them; else Python's. */
    if ((kwnames == NULL || PyTuple_GET_SIZE(kwnames) == 0) && nargs >= 1
        && PyObject_TypeCheck(args[0], am->machine_cls)) {
        switch (am->kind) {
        case A_APPLY:
            result = method_apply(am, args, nargs);
            break;
        case A_DATA:
            result = method_data(am, args, nargs);
            break;
        case A_ON_ID:
            result = method_on_id(am, args, nargs);
            break;
        default:
            result = method_send(am, args, nargs);
            break;
        }
    }
    if (result != FELL) {
        return result;
    }
    return PyObject_Vectorcall(am->py_method, args, nargsf, kwnames);
}

static PyObject *
ack_method_get(PyObject *self, PyObject *obj, PyObject *Py_UNUSED(type))
{
    if (obj == NULL || obj == Py_None) {
        return Py_NewRef(self);
    }
    return PyMethod_New(self, obj);
}

static int
ack_method_traverse(PyObject *self, visitproc visit, void *arg)
{
    AckMethod *am = (AckMethod *)self;
    Py_VISIT(am->machine_cls);
    Py_VISIT(am->sender_cls);
    Py_VISIT(am->entry_cls);
    Py_VISIT(am->memory_cls);
    for (int i = 0; i < C_COUNT; i++) {
        Py_VISIT(am->constants[i]);
    }
    Py_VISIT(am->heappush);
    Py_VISIT(am->py_method);
    Py_VISIT(am->id_name);
    Py_VISIT(am->popitem_name);
    return 0;
}

static int
ack_method_clear(PyObject *self)
{
    AckMethod *am = (AckMethod *)self;
    Py_CLEAR(am->machine_cls);
    Py_CLEAR(am->sender_cls);
    Py_CLEAR(am->entry_cls);
    Py_CLEAR(am->memory_cls);
    for (int i = 0; i < C_COUNT; i++) {
        Py_CLEAR(am->constants[i]);
    }
    Py_CLEAR(am->heappush);
    Py_CLEAR(am->py_method);
    Py_CLEAR(am->id_name);
    Py_CLEAR(am->popitem_name);
    return 0;
}

static void
ack_method_dealloc(PyObject *self)
{
    PyObject_GC_UnTrack(self);
    ack_method_clear(self);
    PyObject_GC_Del(self);
}

static PyTypeObject AckMethodType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "imkit._speedups.AckMethod",
    .tp_basicsize = sizeof(AckMethod),
    .tp_dealloc = ack_method_dealloc,
    .tp_vectorcall_offset = offsetof(AckMethod, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_descr_get = ack_method_get,
    .tp_traverse = ack_method_traverse,
    .tp_clear = ack_method_clear,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_HAVE_GC
                | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = "A method of the ack machines, its common case in C (see ack_methods).",
};

/* member_offsets for ack_methods, after checking that slots is a tuple of n. */
static int
slot_offsets(PyObject *cls, PyObject *slots, Py_ssize_t n, Py_ssize_t *offsets)
{
    if (!PyType_Check(cls) || !PyTuple_Check(slots) || PyTuple_GET_SIZE(slots) != n) {
        PyErr_Format(PyExc_TypeError, "ack_methods(): %zd slots of a class expected", n);
        return 0;
    }
    return member_offsets("ack_methods", cls, slots, n, offsets);
}

PyDoc_STRVAR(ack_methods_doc,
"ack_methods(machine_cls, machine_slots, sender_cls, sender_slots, entry_cls, entry_slots,\n"
"            memory_cls, memory_slots, constants, heappush, py_methods, /)\n"
"--\n\n"
"The methods (_apply, _data, _on_id, _send) doing what the Python methods py_methods (in\n"
"that order) do, in C for the common case, calling the Python method for every other.\n"
"The slots are member descriptors: the machine's _steps, _live, _memory, _heap, _tokens,\n"
"_compact_at, _resend_interval, _ack_timeout, _window, mode; the sender's _backlog,\n"
"_backlog_ids, _retry_slot; the entry's frame, state, give_up_at, token; the memory's\n"
"_max, _remember_for, head. constants: (State.NEW, State.DONE, Input.SEND, Input.DATA,\n"
"AckMode.NONE).");

static PyObject *
ack_methods(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t machine[M_COUNT], sender[S_COUNT], entry[E_COUNT], memory[Y_COUNT];
    PyObject *methods;

    if (!check_nargs("ack_methods", nargs, 11)) {
        return NULL;
    }
    if (!slot_offsets(args[0], args[1], M_COUNT, machine)
        || !slot_offsets(args[2], args[3], S_COUNT, sender)
        || !slot_offsets(args[4], args[5], E_COUNT, entry)
        || !slot_offsets(args[6], args[7], Y_COUNT, memory)) {
        return NULL;
    }
    if (!PyTuple_Check(args[8]) || PyTuple_GET_SIZE(args[8]) != C_COUNT
        || !PyCallable_Check(args[9]) || !PyTuple_Check(args[10])
        || PyTuple_GET_SIZE(args[10]) != A_COUNT) {
        PyErr_SetString(PyExc_TypeError, "ack_methods(): 5 constants, heappush, 4 methods");
        return NULL;
    }
    if (((PyTypeObject *)args[4])->tp_itemsize != 0
        || !PyType_IsSubtype((PyTypeObject *)args[6], &PyDict_Type)
        || !PyType_IsSubtype((PyTypeObject *)args[2], (PyTypeObject *)args[0])) {
        PyErr_SetString(PyExc_TypeError,
                        "ack_methods(): a sender machine, a plain entry class, a dict memory");
        return NULL;
    }
    methods = PyTuple_New(A_COUNT);
    if (methods == NULL) {
        return NULL;
    }
    for (int kind = 0; kind < A_COUNT; kind++) {
        PyObject *py_method = PyTuple_GET_ITEM(args[10], kind);
        AckMethod *am;
        if (!PyCallable_Check(py_method)) {
            PyErr_SetString(PyExc_TypeError, "ack_methods(): 5 constants, heappush, 4 methods");
            Py_DECREF(methods);
            return NULL;
        }
        am = PyObject_GC_New(AckMethod, &AckMethodType);
        if (am == NULL) {
            Py_DECREF(methods);
            return NULL;
        }
        am->vectorcall = ack_method_call;
        am->kind = kind;
        am->machine_cls = (PyTypeObject *)Py_NewRef(args[0]);
        am->sender_cls = (PyTypeObject *)Py_NewRef(args[2]);
        am->entry_cls = (PyTypeObject *)Py_NewRef(args[4]);
        am->memory_cls = (PyTypeObject *)Py_NewRef(args[6]);
        for (int i = 0; i < C_COUNT; i++) {
            am->constants[i] = Py_NewRef(PyTuple_GET_ITEM(args[8], i));
        }
        am->heappush = Py_NewRef(args[9]);
        am->py_method = Py_NewRef(py_method);
        am->id_name = PyUnicode_InternFromString("id");
        am->popitem_name = PyUnicode_InternFromString("popitem");
        memcpy(am->machine, machine, sizeof machine);
        memcpy(am->sender, sender, sizeof sender);
        memcpy(am->entry, entry, sizeof entry);
        memcpy(am->memory, memory, sizeof memory);
        PyObject_GC_Track((PyObject *)am);
        PyTuple_SET_ITEM(methods, kind, (PyObject *)am);
        if (am->id_name == NULL || am->popitem_name == NULL) {
            Py_DECREF(methods);
            return NULL;
        }
    }
    return methods;
}

static PyMethodDef speedups_methods[] = {
    {"read_text", (PyCFunction)(void (*)(void))read_text, METH_FASTCALL, read_text_doc},
    {"frame_texts", (PyCFunction)(void (*)(void))frame_texts, METH_FASTCALL,
     frame_texts_doc},
    {"encode_frame", (PyCFunction)(void (*)(void))encode_frame, METH_FASTCALL,
     encode_frame_doc},
    {"read_control", (PyCFunction)(void (*)(void))read_control, METH_FASTCALL,
     read_control_doc},
    {"read_frame", (PyCFunction)(void (*)(void))read_frame, METH_FASTCALL, read_frame_doc},
    {"read_fields", (PyCFunction)(void (*)(void))read_fields, METH_FASTCALL, read_fields_doc},
    {"slot_maker", (PyCFunction)(void (*)(void))slot_maker, METH_FASTCALL, slot_maker_doc},
    {"plain_append", (PyCFunction)(void (*)(void))plain_append, METH_FASTCALL,
     plain_append_doc},
    {"ack_methods", (PyCFunction)(void (*)(void))ack_methods, METH_FASTCALL, ack_methods_doc},
    {NULL, NULL, 0, NULL},
};

static int
speedups_exec(PyObject *module)
{
    if (PyType_Ready(&SlotMakerType) < 0 || PyType_Ready(&AckMethodType) < 0) {
        return -1;
    }
    if (PyModule_AddObjectRef(module, "AckMethod", (PyObject *)&AckMethodType) < 0) {
        return -1;
    }
    return PyModule_AddObjectRef(module, "SlotMaker", (PyObject *)&SlotMakerType);
}

static PyModuleDef_Slot speedups_slots[] = {
    {Py_mod_exec, speedups_exec},
    {0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "imkit._speedups",
    .m_doc = "The WebSocket framing, frame codec and ack machine steps of imkit's common "
             "case in C (optional; see imkit.core._framing, imkit.core.frames and "
             "imkit.core.ack).",
    .m_size = 0,
    .m_methods = speedups_methods,
    .m_slots = speedups_slots,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&speedups_module);
}
