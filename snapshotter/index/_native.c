/* _native: the inner loops of an index build, in C.
 *
 * inflate_blocks: an index build needs every deflate block boundary of the layer (checkpoint
 * candidates and block marks), and zlib's inflate(Z_BLOCK) returns at each one. Looping over
 * the blocks in Python costs a round trip through the interpreter, and so a re-acquisition of
 * the GIL, per block: thousands per layer, each a stall of the decoding thread behind the tar
 * parser that holds the GIL in the calling thread. This loop inflates a whole input buffer
 * with the GIL released and records the boundaries in a caller-supplied array. The stream and
 * the inflate function come from inflate.py, which binds zlib-ng's native API (or the system
 * zlib) with ctypes; only their addresses cross over here, so this module links against
 * neither library.
 *
 * scan_members: most members of a layer are plain ustar/GNU headers (no PAX record, no long
 * name) whose data lies in the piece of stream at hand. Reading their fields in Python costs
 * several microseconds each; this reads a run of them and builds their Member objects. It
 * stops at the first header it does not fully understand and leaves it, and everything after
 * it, to the Python scanner's general path, which handles every header (and gives the same
 * Member for the ones this accepts).
 *
 * digest_files: a layer has tens of thousands of small files; hashing each with hashlib costs
 * an interpreter round trip and, under 2 KiB, holds the GIL. This hashes a piece's files in one
 * call with the GIL released, through libcrypto's SHA256 (whose address hashing.py finds, as
 * inflate.py does for zlib-ng), so this module links against no library.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* The leading fields of zlib's z_stream and zlib-ng's zng_stream, which agree on LP64 up to
 * data_type (inflate.py's _Stream describes the same layout). */
typedef struct {
    const unsigned char *next_in;
    uint32_t avail_in;
    size_t total_in;
    unsigned char *next_out;
    uint32_t avail_out;
    size_t total_out;
    const char *msg;
    void *state;
    void *zalloc;
    void *zfree;
    void *opaque;
    int data_type;
} stream_head;

typedef int (*inflate_fn)(void *strm, int flush);

#define CLIP_Z_OK 0
#define CLIP_Z_BLOCK 5
#define BOUND_FIELDS 3

PyDoc_STRVAR(inflate_blocks_doc,
"inflate_blocks(stream, inflate, bounds, piece, start) -> (rc, count)\n\n"
"Call inflate(stream, Z_BLOCK), writing into piece[start:], until it returns anything but\n"
"Z_OK, the piece is full, the input is used up without output, or ``bounds`` is full.\n"
"``stream`` is the address of a prepared z_stream / zng_stream and ``inflate`` the address\n"
"of the matching inflate function; ``piece`` is a bytes object from new_piece() that nothing\n"
"else has seen yet (the output goes straight into it, so it is never copied). For each block\n"
"boundary passed, three int64 values go to ``bounds``: the output offset and the input\n"
"offset (both relative to the call's start) and the number of bits of the last input byte\n"
"that belong to the next block. Returns inflate's last return code and the number of\n"
"boundaries recorded.");

static PyObject *
inflate_blocks(PyObject *module, PyObject *args)
{
    unsigned long long stream_addr, inflate_addr;
    Py_buffer bounds;
    PyObject *piece;
    Py_ssize_t start;
    (void)module;
    if (!PyArg_ParseTuple(args, "KKw*O!n:inflate_blocks", &stream_addr, &inflate_addr, &bounds,
                          &PyBytes_Type, &piece, &start))
        return NULL;
    Py_ssize_t cap = bounds.len / (Py_ssize_t)(BOUND_FIELDS * sizeof(int64_t));
    Py_ssize_t size = PyBytes_GET_SIZE(piece);
    if (cap < 1 || stream_addr == 0 || inflate_addr == 0 || start < 0 || start >= size
        || size - start > UINT32_MAX) {
        PyBuffer_Release(&bounds);
        PyErr_SetString(PyExc_ValueError,
                        "inflate_blocks: needs a stream, an inflate function, room for a bound "
                        "and room in the piece");
        return NULL;
    }
    stream_head *s = (stream_head *)(uintptr_t)stream_addr;
    inflate_fn inflate = (inflate_fn)(uintptr_t)inflate_addr;
    int64_t *out = (int64_t *)bounds.buf;
    unsigned char *out_start = (unsigned char *)PyBytes_AS_STRING(piece) + start;
    Py_ssize_t count = 0;
    int rc;

    Py_BEGIN_ALLOW_THREADS
    const unsigned char *in_start = s->next_in;
    s->next_out = out_start;
    s->avail_out = (uint32_t)(size - start);
    for (;;) {
        uint32_t room = s->avail_out;
        rc = inflate(s, CLIP_Z_BLOCK);
        if (rc != CLIP_Z_OK)
            break;
        if ((s->data_type & 0xC0) == 0x80) { /* just after a block end (or the header) */
            int64_t *slot = out + BOUND_FIELDS * count;
            slot[0] = (int64_t)(s->next_out - out_start);
            slot[1] = (int64_t)(s->next_in - in_start);
            slot[2] = (int64_t)(s->data_type & 7);
            count++;
        }
        if (s->avail_out == 0 || count == cap || (s->avail_in == 0 && room == s->avail_out))
            break;
    }
    Py_END_ALLOW_THREADS

    PyBuffer_Release(&bounds);
    return Py_BuildValue("in", rc, count);
}

PyDoc_STRVAR(new_piece_doc,
"new_piece(size) -> bytes\n\n"
"A bytes object of ``size`` bytes whose contents are not initialised, for inflate_blocks to\n"
"fill: a build's uncompressed stream is written once, into the objects that are handed on.");

static PyObject *
new_piece(PyObject *module, PyObject *arg)
{
    (void)module;
    Py_ssize_t size = PyLong_AsSsize_t(arg);
    if (size == -1 && PyErr_Occurred())
        return NULL;
    if (size <= 0) {
        PyErr_SetString(PyExc_ValueError, "new_piece: size must be positive");
        return NULL;
    }
    return PyBytes_FromStringAndSize(NULL, size);
}

/* ---- scan_members ------------------------------------------------------------------- */

#define BLOCK 512
#define MEMBER_FIELDS 13
/* 2**63 ns, in seconds: a later mtime goes to the Python path (arbitrary-size ints there). */
#define MAX_MTIME 9223372036LL

/* An octal header field as the Python scanner's fast path reads it: optional leading spaces,
 * at least one octal digit, then only NULs and spaces. Anything else (base-256 numbers, junk
 * after a NUL, an empty field) returns 0, and the header goes to the general path. */
static int
octal_field(const unsigned char *field, int length, long long *value)
{
    int i = 0;
    while (i < length && field[i] == ' ')
        i++;
    int first = i;
    unsigned long long v = 0;
    while (i < length && field[i] >= '0' && field[i] <= '7')
        v = v * 8 + (unsigned long long)(field[i++] - '0');
    if (i == first)
        return 0;
    while (i < length && (field[i] == 0 || field[i] == ' '))
        i++;
    *value = (long long)v; /* at most 12 digits: 36 bits */
    return i == length;
}

static size_t
cstring_length(const unsigned char *field, size_t length)
{
    const unsigned char *nul = memchr(field, 0, length);
    return nul ? (size_t)(nul - field) : length;
}

static int
is_zero_block(const unsigned char *block)
{
    for (int i = 0; i < BLOCK; i++)
        if (block[i])
            return 0;
    return 1;
}

/* The path of a header: ustar prefix + "/" + name, or the name alone. */
static PyObject *
header_path(const unsigned char *block)
{
    size_t name_len = cstring_length(block, 100);
    if (memcmp(block + 257, "ustar\0", 6) != 0 || block[345] == 0)
        return PyUnicode_DecodeUTF8((const char *)block, (Py_ssize_t)name_len,
                                    "surrogateescape");
    size_t prefix_len = cstring_length(block + 345, 155);
    char joined[256 + 1];
    memcpy(joined, block + 345, prefix_len);
    joined[prefix_len] = '/';
    memcpy(joined + prefix_len + 1, block, name_len);
    return PyUnicode_DecodeUTF8(joined, (Py_ssize_t)(prefix_len + 1 + name_len),
                                "surrogateescape");
}

/* ``raw`` normalised when that is a matter of dropping a leading "./" or a trailing "/";
 * otherwise the Python ``normalise`` decides (and raises for paths that escape the root). */
static PyObject *
normalised_path(PyObject *raw, PyObject *normalise)
{
    Py_ssize_t length = PyUnicode_GET_LENGTH(raw);
    Py_ssize_t start = 0;
    if (length >= 2 && PyUnicode_READ_CHAR(raw, 0) == '.' && PyUnicode_READ_CHAR(raw, 1) == '/')
        start = 2;
    Py_ssize_t end = length;
    int simple = 1;
    if (start < end) {
        Py_UCS4 first = PyUnicode_READ_CHAR(raw, start);
        simple = first != '/' && first != '.';
    }
    for (Py_ssize_t i = start; simple && i + 1 < end; i++) {
        if (PyUnicode_READ_CHAR(raw, i) == '/') {
            Py_UCS4 next = PyUnicode_READ_CHAR(raw, i + 1);
            simple = next != '.' && next != '/';
        }
    }
    if (!simple)
        return PyObject_CallOneArg(normalise, raw);
    if (end > start && PyUnicode_READ_CHAR(raw, end - 1) == '/')
        end--;
    return PyUnicode_Substring(raw, start, end);
}

/* The Member of the plain header at ``block``, or Py_None when the general path must take it
 * (NULL with an exception set on error). ``*data_size`` receives the bytes of data that follow
 * the header in the stream. */
static PyObject *
plain_member(const unsigned char *block, long long uoff, PyObject *member_class,
             PyObject *types, PyObject *normalise, PyObject *no_xattrs, long long *data_size)
{
    unsigned char kind = block[156];
    PyObject *etype = PyTuple_GET_ITEM(types, kind);
    if (etype == Py_None || block[0] == 0)
        Py_RETURN_NONE;
    long long stored, mode, uid, gid, size, mtime, major = 0, minor = 0;
    if (!octal_field(block + 148, 8, &stored) || !octal_field(block + 100, 8, &mode)
        || !octal_field(block + 108, 8, &uid) || !octal_field(block + 116, 8, &gid)
        || !octal_field(block + 124, 12, &size) || !octal_field(block + 136, 12, &mtime)
        || mtime > MAX_MTIME)
        Py_RETURN_NONE;
    int device = kind == '3' || kind == '4';
    if (device && (!octal_field(block + 329, 8, &major) || !octal_field(block + 337, 8, &minor)))
        Py_RETURN_NONE;
    long long summed = 8 * ' ';
    for (int i = 0; i < BLOCK; i++)
        if (i < 148 || i >= 156)
            summed += block[i];
    if (summed != stored)
        Py_RETURN_NONE;
    int regular = kind == '0' || kind == 0 || kind == '7';
    PyObject *raw = header_path(block);
    if (raw == NULL)
        return NULL;
    if (regular && PyUnicode_READ_CHAR(raw, PyUnicode_GET_LENGTH(raw) - 1) == '/') {
        Py_DECREF(raw); /* a pre-POSIX directory: the general path knows */
        Py_RETURN_NONE;
    }
    PyObject *args[MEMBER_FIELDS] = {NULL};
    args[0] = normalised_path(raw, normalise);
    args[1] = raw;
    args[2] = etype;
    args[3] = PyLong_FromLongLong(mode & 07777);
    args[4] = PyLong_FromLongLong(uid);
    args[5] = PyLong_FromLongLong(gid);
    args[6] = PyLong_FromLongLong(regular ? size : 0);
    args[7] = PyLong_FromLongLong(mtime * 1000000000LL);
    if (kind == '1' || kind == '2')
        args[8] = PyUnicode_DecodeUTF8((const char *)block + 157,
                                       (Py_ssize_t)cstring_length(block + 157, 100),
                                       "surrogateescape");
    else
        args[8] = PyUnicode_New(0, 0);
    args[9] = PyLong_FromLongLong(major);
    args[10] = PyLong_FromLongLong(minor);
    args[11] = no_xattrs;
    args[12] = PyLong_FromLongLong(uoff);
    PyObject *member = NULL;
    int complete = 1;
    for (int i = 0; i < MEMBER_FIELDS; i++)
        complete &= args[i] != NULL;
    if (complete)
        member = PyObject_Vectorcall(member_class, args, MEMBER_FIELDS, NULL);
    for (int i = 0; i < MEMBER_FIELDS; i++)
        if (i != 2 && i != 11)
            Py_XDECREF(args[i]);
    *data_size = regular ? size : 0;
    return member;
}

PyDoc_STRVAR(scan_members_doc,
"scan_members(buffer, start, base, member_class, types, normalise, no_xattrs)\n"
"    -> (members, stop)\n\n"
"Read the run of plain ustar/GNU headers at buffer[start:], each with its data (and padding)\n"
"inside the buffer, and build their members. ``base`` is the stream offset of buffer[0];\n"
"``types`` maps each typeflag byte (a 256-tuple) to its EntryType, or None for a type the\n"
"general path must take. ``stop`` is the offset of the first header not taken.");

static PyObject *
scan_members(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "scan_members takes 7 arguments");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    long long base = PyLong_AsLongLong(args[2]);
    PyObject *member_class = args[3], *types = args[4], *normalise = args[5];
    PyObject *no_xattrs = args[6];
    PyObject *members = NULL;
    if (PyErr_Occurred())
        goto done;
    if (!PyTuple_Check(types) || PyTuple_GET_SIZE(types) != 256 || pos < 0) {
        PyErr_SetString(PyExc_ValueError, "scan_members: bad start or types table");
        goto done;
    }
    members = PyList_New(0);
    if (members == NULL)
        goto done;
    const unsigned char *buf = view.buf;
    while (view.len - pos >= BLOCK) {
        const unsigned char *block = buf + pos;
        if (is_zero_block(block))
            break;
        long long data_size = 0;
        PyObject *member = plain_member(block, base + pos + BLOCK, member_class, types,
                                        normalise, no_xattrs, &data_size);
        if (member == NULL) {
            Py_CLEAR(members);
            goto done;
        }
        long long next = pos + BLOCK + data_size + ((BLOCK - data_size % BLOCK) % BLOCK);
        if (member == Py_None || next > view.len) {
            Py_DECREF(member);
            break;
        }
        int failed = PyList_Append(members, member);
        Py_DECREF(member);
        if (failed) {
            Py_CLEAR(members);
            goto done;
        }
        pos = (Py_ssize_t)next;
    }
done:
    PyBuffer_Release(&view);
    if (members == NULL)
        return NULL;
    PyObject *result = Py_BuildValue("(Nn)", members, pos);
    return result;
}

/* ---- digest_files ------------------------------------------------------------------ */

typedef unsigned char *(*sha256_fn)(const unsigned char *data, size_t length, unsigned char *md);
#define DIGEST 32

PyDoc_STRVAR(digest_files_doc,
"digest_files(files, chunk_size, sha256) -> None\n\n"
"For each (member, data) in ``files``, append to member.digests the sha256 of data's\n"
"consecutive ``chunk_size``-byte chunks (one digest for data up to chunk_size; none for\n"
"empty data). ``sha256`` is the address of libcrypto's one-shot SHA256(). All hashing runs\n"
"with the GIL released, so a piece's small files cost no interpreter time each.");

static PyObject *
digest_files(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "digest_files(files: list, chunk_size, sha256)");
        return NULL;
    }
    PyObject *files = args[0];
    Py_ssize_t chunk = PyLong_AsSsize_t(args[1]);
    void *address = PyLong_AsVoidPtr(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (chunk <= 0 || address == NULL) {
        PyErr_SetString(PyExc_ValueError, "digest_files: bad chunk size or sha256 address");
        return NULL;
    }
    sha256_fn sha256 = (sha256_fn)address;
    Py_ssize_t count = PyList_GET_SIZE(files);
    Py_buffer *views = PyMem_Calloc((size_t)count + 1, sizeof(Py_buffer));
    Py_ssize_t *firsts = PyMem_Calloc((size_t)count + 1, sizeof(Py_ssize_t));
    unsigned char *digests = NULL;
    Py_ssize_t held = 0, total = 0;
    PyObject *result = NULL;
    if (views == NULL || firsts == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; held < count; held++) {
        PyObject *item = PyList_GET_ITEM(files, held);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_TypeError, "digest_files: items are (member, data)");
            goto done;
        }
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(item, 1), &views[held], PyBUF_SIMPLE) < 0)
            goto done;
        firsts[held] = total;
        total += (views[held].len + chunk - 1) / chunk;
    }
    firsts[count] = total;
    digests = PyMem_Malloc((size_t)total * DIGEST + 1);
    if (digests == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < count; i++) {
        const unsigned char *data = views[i].buf;
        Py_ssize_t length = views[i].len;
        unsigned char *out = digests + (size_t)firsts[i] * DIGEST;
        for (Py_ssize_t at = 0; at < length; at += chunk, out += DIGEST)
            sha256(data + at, (size_t)(length - at < chunk ? length - at : chunk), out);
    }
    Py_END_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *list = PyObject_GetAttrString(PyTuple_GET_ITEM(PyList_GET_ITEM(files, i), 0),
                                                "digests");
        if (list == NULL)
            goto done;
        int failed = !PyList_Check(list);
        for (Py_ssize_t k = firsts[i]; !failed && k < firsts[i + 1]; k++) {
            PyObject *digest = PyBytes_FromStringAndSize(
                (const char *)digests + (size_t)k * DIGEST, DIGEST);
            failed = digest == NULL || PyList_Append(list, digest) < 0;
            Py_XDECREF(digest);
        }
        Py_DECREF(list);
        if (failed) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "digest_files: member.digests is not a list");
            goto done;
        }
    }
    result = Py_NewRef(Py_None);
done:
    for (Py_ssize_t i = 0; i < held; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(firsts);
    PyMem_Free(digests);
    return result;
}

/* ---- module -------------------------------------------------------------------------- */

static PyMethodDef native_methods[] = {
    {"inflate_blocks", inflate_blocks, METH_VARARGS, inflate_blocks_doc},
    {"new_piece", new_piece, METH_O, new_piece_doc},
    {"digest_files", (PyCFunction)(void (*)(void))digest_files, METH_FASTCALL,
     digest_files_doc},
    {"scan_members", (PyCFunction)(void (*)(void))scan_members, METH_FASTCALL,
     scan_members_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    "snapshotter.index._native",
    "The inner loops of an index build, in C (see _native.c).",
    -1,
    native_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    return PyModule_Create(&native_module);
}
