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
 *
 * encode_tree: once the stream has ended, numbering the tree breadth-first and encoding one
 * record per entry runs on one core while the other idles; in Python it was 0.1 s of a
 * 40k-entry build. This does it in one pass over the nodes and checks every value against its
 * record field.
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
#define BOUND_FIELDS 4
#define MAX_PIECES 16

PyDoc_STRVAR(inflate_blocks_doc,
"inflate_blocks(stream, inflate, bounds, pieces, start, stop=-1)\n"
"    -> (rc, piece, filled, count)\n\n"
"Call inflate(stream, Z_BLOCK), writing into pieces[0][start:] and then into the following\n"
"pieces as each fills up, until it returns anything but Z_OK, the last piece is full, the\n"
"input is used up without output, ``bounds`` is full, or (``stop`` >= 0) a block boundary\n"
"at or past offset ``stop`` of pieces[0] has been recorded. ``stream`` is the address of a\n"
"prepared z_stream / zng_stream and ``inflate`` the address of the matching inflate\n"
"function; ``pieces`` is a list of equally sized bytes objects from new_piece() that nothing\n"
"else has seen yet (the output goes straight into them, so it is never copied). For each\n"
"block boundary passed, four int64 values go to ``bounds``: the piece index, the offset in\n"
"that piece, the input offset relative to the call's start and the number of bits of the\n"
"last input byte that belong to the next block. Returns inflate's last return code, the\n"
"index of the piece being filled, the bytes filled in it and the number of boundaries.");

static PyObject *
inflate_blocks(PyObject *module, PyObject *args)
{
    unsigned long long stream_addr, inflate_addr;
    Py_buffer bounds;
    PyObject *pieces;
    Py_ssize_t start, stop = -1;
    (void)module;
    if (!PyArg_ParseTuple(args, "KKw*O!n|n:inflate_blocks", &stream_addr, &inflate_addr,
                          &bounds, &PyList_Type, &pieces, &start, &stop))
        return NULL;
    Py_ssize_t cap = bounds.len / (Py_ssize_t)(BOUND_FIELDS * sizeof(int64_t));
    Py_ssize_t npieces = PyList_GET_SIZE(pieces), size = 0;
    unsigned char *bases[MAX_PIECES];
    int usable = cap >= 1 && stream_addr != 0 && inflate_addr != 0 && npieces >= 1
                 && npieces <= MAX_PIECES;
    for (Py_ssize_t k = 0; usable && k < npieces; k++) {
        PyObject *piece = PyList_GET_ITEM(pieces, k);
        usable = PyBytes_CheckExact(piece)
                 && (k == 0 ? (size = PyBytes_GET_SIZE(piece)) > 0
                            : PyBytes_GET_SIZE(piece) == size);
        if (usable)
            bases[k] = (unsigned char *)PyBytes_AS_STRING(piece);
    }
    if (!usable || start < 0 || start >= size || size > UINT32_MAX) {
        PyBuffer_Release(&bounds);
        PyErr_SetString(PyExc_ValueError,
                        "inflate_blocks: needs a stream, an inflate function, room for a bound "
                        "and 1-16 equal pieces with room in the first");
        return NULL;
    }
    stream_head *s = (stream_head *)(uintptr_t)stream_addr;
    inflate_fn inflate = (inflate_fn)(uintptr_t)inflate_addr;
    int64_t *out = (int64_t *)bounds.buf;
    Py_ssize_t count = 0, current = 0, filled;
    int rc;

    Py_BEGIN_ALLOW_THREADS
    const unsigned char *in_start = s->next_in;
    s->next_out = bases[0] + start;
    s->avail_out = (uint32_t)(size - start);
    for (;;) {
        uint32_t room = s->avail_out;
        rc = inflate(s, CLIP_Z_BLOCK);
        if (rc != CLIP_Z_OK)
            break;
        int progress = room != s->avail_out;
        if ((s->data_type & 0xC0) == 0x80) { /* just after a block end (or the header) */
            int64_t *slot = out + BOUND_FIELDS * count;
            slot[0] = (int64_t)current;
            slot[1] = (int64_t)(s->next_out - bases[current]);
            slot[2] = (int64_t)(s->next_in - in_start);
            slot[3] = (int64_t)(s->data_type & 7);
            count++;
            if (stop >= 0 && current == 0 && slot[1] >= stop)
                break;
        }
        if (s->avail_out == 0) {
            if (current + 1 == npieces)
                break;
            current++;
            s->next_out = bases[current];
            s->avail_out = (uint32_t)size;
        }
        if (count == cap || (s->avail_in == 0 && !progress))
            break;
    }
    filled = (Py_ssize_t)(s->next_out - bases[current]);
    Py_END_ALLOW_THREADS

    PyBuffer_Release(&bounds);
    return Py_BuildValue("innn", rc, current, filled, count);
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

/* One int object per mode value (new reference), shared by every member with that mode, as
 * tarscan._shared_mode does on the general path: an int each would cost 32 bytes a member. */
static PyObject *modes[010000];

static PyObject *
shared_mode(int mode)
{
    if (modes[mode] == NULL)
        modes[mode] = PyLong_FromLong(mode);
    return Py_XNewRef(modes[mode]);
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
    args[3] = shared_mode((int)(mode & 07777));
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
"For each (member, data) in ``files``, add to member.digests (bytes) the sha256 of data's\n"
"consecutive ``chunk_size``-byte chunks, concatenated (one digest for data up to chunk_size;\n"
"none for empty data). ``sha256`` is the address of libcrypto's one-shot SHA256(). All hashing runs\n"
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
        if (firsts[i + 1] == firsts[i])
            continue;  /* an empty file: no digest */
        PyObject *member = PyTuple_GET_ITEM(PyList_GET_ITEM(files, i), 0);
        PyObject *have = PyObject_GetAttrString(member, "digests");
        if (have == NULL)
            goto done;
        if (!PyBytes_Check(have)) {
            Py_DECREF(have);
            PyErr_SetString(PyExc_TypeError, "digest_files: member.digests is not bytes");
            goto done;
        }
        PyObject *added = PyBytes_FromStringAndSize(
            (const char *)digests + (size_t)firsts[i] * DIGEST,
            (firsts[i + 1] - firsts[i]) * DIGEST);
        PyBytes_Concat(&have, added);  /* ``have`` becomes the sum, or NULL on error */
        Py_XDECREF(added);
        int failed = have == NULL || PyObject_SetAttrString(member, "digests", have) < 0;
        Py_XDECREF(have);
        if (failed)
            goto done;
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

/* ---- encode_tree ------------------------------------------------------------------- */

#define ENTRY_SIZE 96
#define XATTR_SIZE 16
#define TYPE_FILE 0
#define TYPE_DIR 1
#define TYPE_SYMLINK 2
#define TYPE_HARDLINK 3

/* A growable byte buffer: a bytes object of the capacity, resized in place and handed out
 * at its length by buffer_take, so the encoded body is never copied (a copy of a 50,000-entry
 * layer's records and strings would be 7 MB more at the build's peak). */
typedef struct {
    PyObject *bytes;
    char *data;
    size_t length, capacity;
} buffer;

static int
buffer_reserve(buffer *b, size_t more)
{
    if (b->length + more <= b->capacity)
        return 0;
    size_t capacity = b->capacity ? b->capacity : 1 << 16;
    while (capacity < b->length + more)
        capacity *= 2;
    if (b->bytes == NULL)
        b->bytes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)capacity);
    else if (_PyBytes_Resize(&b->bytes, (Py_ssize_t)capacity) < 0)
        b->bytes = NULL; /* freed by the failed resize */
    if (b->bytes == NULL) {
        b->data = NULL;
        b->length = b->capacity = 0;
        return -1;
    }
    b->data = PyBytes_AS_STRING(b->bytes);
    b->capacity = capacity;
    return 0;
}

/* The buffer's bytes, trimmed to its length; the buffer is empty afterwards. */
static PyObject *
buffer_take(buffer *b)
{
    PyObject *out = b->bytes;
    b->bytes = NULL;
    b->data = NULL;
    b->capacity = 0;
    if (out == NULL)
        return PyBytes_FromStringAndSize("", 0);
    if (_PyBytes_Resize(&out, (Py_ssize_t)b->length) < 0)
        return NULL;
    return out;
}

static int
buffer_add(buffer *b, const void *data, size_t length)
{
    if (buffer_reserve(b, length) < 0)
        return -1;
    memcpy(b->data + b->length, data, length);
    b->length += length;
    return 0;
}

static void
put32(unsigned char *at, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        at[i] = (unsigned char)(v >> (8 * i));
}

static void
put64(unsigned char *at, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        at[i] = (unsigned char)(v >> (8 * i));
}

/* Interned attribute names, made once. */
static PyObject *s_children, *s_member, *s_type, *s_link, *s_links, *s_name, *s_ordinal;
static PyObject *s_mode, *s_uid, *s_gid, *s_size, *s_mtime_ns, *s_uoff, *s_linkname;
static PyObject *s_devmajor, *s_devminor, *s_xattrs, *s_digests, *s_raw_path, *s_parent;

static int
intern_names(void)
{
    if (s_children != NULL)
        return 0;
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return -1
    INTERN(s_children, "children"); INTERN(s_member, "member"); INTERN(s_type, "type");
    INTERN(s_link, "link"); INTERN(s_links, "links"); INTERN(s_name, "name");
    INTERN(s_ordinal, "ordinal"); INTERN(s_mode, "mode"); INTERN(s_uid, "uid");
    INTERN(s_gid, "gid"); INTERN(s_size, "size"); INTERN(s_mtime_ns, "mtime_ns");
    INTERN(s_uoff, "uoff"); INTERN(s_linkname, "linkname"); INTERN(s_devmajor, "devmajor");
    INTERN(s_devminor, "devminor"); INTERN(s_xattrs, "xattrs"); INTERN(s_digests, "digests");
    INTERN(s_raw_path, "raw_path"); INTERN(s_parent, "parent");
#undef INTERN
    return 0;
}

/* An integer attribute of ``obj`` in [low, high]; on a value out of range, ``error`` (the
 * index's LayerFormatError) naming the entry and the field. Returns -1 with an exception set
 * on failure. */
static int
int_field(PyObject *obj, PyObject *name, long long low, unsigned long long high,
          PyObject *member, PyObject *error, unsigned long long *out)
{
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL)
        return -1;
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (v == -1 && PyErr_Occurred()) {
        Py_DECREF(value);
        return -1;
    }
    unsigned long long u = (unsigned long long)v;
    int in_range = overflow == 0 && v >= low && (v < 0 || u <= high);
    if (!in_range && overflow > 0 && high == UINT64_MAX) { /* above int64, still a u64? */
        u = PyLong_AsUnsignedLongLong(value);
        in_range = !(u == (unsigned long long)-1 && PyErr_Occurred());
        PyErr_Clear();
    }
    if (!in_range) {
        PyObject *path = member ? PyObject_GetAttr(member, s_raw_path) : NULL;
        PyErr_Clear();
        PyErr_Format(error, "layer entry %R: %U %S does not fit the index (%lld..%llu)",
                     path ? path : Py_None, name, value, low, high);
        Py_XDECREF(path);
        Py_DECREF(value);
        return -1;
    }
    Py_DECREF(value);
    *out = u;
    return 0;
}

/* The string attribute ``name`` of ``obj`` as UTF-8 with surrogateescape, appended to
 * ``strings``; its length goes to ``*length``. */
static int
add_text(buffer *strings, PyObject *text, size_t *length)
{
    PyObject *encoded = PyUnicode_AsEncodedString(text, "utf-8", "surrogateescape");
    if (encoded == NULL)
        return -1;
    *length = (size_t)PyBytes_GET_SIZE(encoded);
    int failed = buffer_add(strings, PyBytes_AS_STRING(encoded), *length);
    Py_DECREF(encoded);
    return failed;
}

typedef struct {
    buffer records, xattrs, digests, strings;
    Py_ssize_t xattr_count, digest_count;
} encoded;

/* Sorted xattrs of ``member``: records to ``out->xattrs``, names and values to strings. */
static int
add_xattrs(encoded *out, PyObject *xattrs)
{
    PyObject *keys = PyMapping_Keys(xattrs);
    if (keys == NULL || PyList_Sort(keys) < 0) {
        Py_XDECREF(keys);
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(keys); i++) {
        PyObject *key = PyList_GET_ITEM(keys, i);
        PyObject *value = PyObject_GetItem(xattrs, key);
        size_t key_off = out->strings.length, key_len = 0;
        if (value == NULL || add_text(&out->strings, key, &key_len) < 0
            || !PyBytes_Check(value)) {
            if (value != NULL && !PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "encode_tree: xattr values are bytes");
            Py_XDECREF(value);
            Py_DECREF(keys);
            return -1;
        }
        size_t value_len = (size_t)PyBytes_GET_SIZE(value);
        int failed = buffer_add(&out->strings, PyBytes_AS_STRING(value), value_len);
        Py_DECREF(value);
        unsigned char record[XATTR_SIZE];
        put32(record, (uint32_t)key_off);
        put32(record + 4, (uint32_t)key_len);
        put32(record + 8, (uint32_t)(key_off + key_len));
        put32(record + 12, (uint32_t)value_len);
        if (failed || buffer_add(&out->xattrs, record, XATTR_SIZE) < 0) {
            Py_DECREF(keys);
            return -1;
        }
        out->xattr_count++;
    }
    Py_DECREF(keys);
    return 0;
}

static uint32_t
get32(const unsigned char *at)
{
    return (uint32_t)at[0] | (uint32_t)at[1] << 8 | (uint32_t)at[2] << 16
           | (uint32_t)at[3] << 24;
}

/* Append the node's full path to the strings: its parent's path, already there (nodes are
 * encoded breadth-first, so the parent's record is written), "/" and its name; the root's is
 * empty and a top-level node's is its name. Sets *off and *len to where it went. */
static int
add_path(encoded *out, Py_ssize_t ordinal, Py_ssize_t parent, PyObject *name, size_t *off,
         size_t *len)
{
    *off = out->strings.length;
    *len = 0;
    if (ordinal == 0)
        return 0;
    size_t name_len = (size_t)PyBytes_GET_SIZE(name), parent_off = 0, parent_len = 0;
    if (parent != 0) {
        const unsigned char *record = (unsigned char *)out->records.data + parent * ENTRY_SIZE;
        parent_off = get32(record);
        parent_len = get32(record + 4);
    }
    size_t length = parent_len + (parent_len ? 1 : 0) + name_len;
    if (buffer_reserve(&out->strings, length) < 0)
        return -1;
    char *to = out->strings.data + *off; /* after the reserve: it may move the buffer */
    memcpy(to, out->strings.data + parent_off, parent_len);
    if (parent_len)
        to[parent_len] = '/';
    memcpy(to + length - name_len, PyBytes_AS_STRING(name), name_len);
    out->strings.length += length;
    *len = length;
    return 0;
}

/* The record of one node. */
static int
encode_node(encoded *out, PyObject *node, Py_ssize_t ordinal, Py_ssize_t parent,
            Py_ssize_t first_child, Py_ssize_t child_count, Py_ssize_t subdirs,
            PyObject *error)
{
    unsigned char r[ENTRY_SIZE] = {0};
    size_t path_off, path_len;
    PyObject *type = PyObject_GetAttr(node, s_type), *name = PyObject_GetAttr(node, s_name);
    PyObject *link = PyObject_GetAttr(node, s_link), *member = PyObject_GetAttr(node, s_member);
    PyObject *links = NULL;
    int result = -1;
    if (type == NULL || name == NULL || link == NULL || member == NULL)
        goto done;
    if (!PyBytes_Check(name)) {
        PyErr_SetString(PyExc_TypeError, "encode_tree: names are bytes");
        goto done;
    }
    if (add_path(out, ordinal, parent, name, &path_off, &path_len) < 0)
        goto done;
    long etype = PyLong_AsLong(type);
    long long link_target = -1;
    if (link != Py_None) {
        PyObject *ordinal = PyObject_GetAttr(link, s_ordinal);
        if (ordinal == NULL)
            goto done;
        link_target = PyLong_AsLongLong(ordinal);
        Py_DECREF(ordinal);
    }
    unsigned long long nlink;
    if (etype == TYPE_DIR) {
        nlink = 2 + (unsigned long long)subdirs;
    } else {
        links = PyObject_GetAttr(link != Py_None ? link : node, s_links);
        if (links == NULL)
            goto done;
        nlink = 1 + (unsigned long long)(links != Py_None ? PyObject_Length(links) : 0);
    }
    if (PyErr_Occurred())
        goto done;
    put32(r, (uint32_t)path_off);
    put32(r + 4, (uint32_t)path_len);
    put32(r + 8, (uint32_t)PyBytes_GET_SIZE(name));
    put32(r + 12, (uint32_t)parent);
    r[16] = (unsigned char)etype;
    put32(r + 60, (uint32_t)(int32_t)link_target);
    put32(r + 64, (uint32_t)nlink);
    put32(r + 76, (uint32_t)out->xattr_count);
    put32(r + 84, (uint32_t)first_child);
    put32(r + 88, (uint32_t)child_count);
    put32(r + 92, (uint32_t)out->digest_count);
    if (member == Py_None) { /* the root or a synthesised directory */
        r[18] = 0755 & 0xFF;
        r[19] = 0755 >> 8;
        put32(r + 52, (uint32_t)out->strings.length);
        result = buffer_add(&out->records, r, ENTRY_SIZE);
        goto done;
    }
    unsigned long long mode, uid, gid, mtime, major, minor, size = 0, uoff = 0;
    if (int_field(member, s_mode, 0, 0xFFFF, member, error, &mode) < 0
        || int_field(member, s_uid, 0, UINT32_MAX, member, error, &uid) < 0
        || int_field(member, s_gid, 0, UINT32_MAX, member, error, &gid) < 0
        || int_field(member, s_mtime_ns, INT64_MIN, INT64_MAX, member, error, &mtime) < 0
        || int_field(member, s_devmajor, 0, UINT32_MAX, member, error, &major) < 0
        || int_field(member, s_devminor, 0, UINT32_MAX, member, error, &minor) < 0)
        goto done;
    PyObject *xattrs = PyObject_GetAttr(member, s_xattrs);
    Py_ssize_t x_first = out->xattr_count;
    int failed = xattrs == NULL || (PyObject_IsTrue(xattrs) && add_xattrs(out, xattrs) < 0);
    Py_XDECREF(xattrs);
    if (failed)
        goto done;
    size_t link_off = out->strings.length, link_len = 0;
    if (etype == TYPE_SYMLINK || etype == TYPE_HARDLINK) {
        PyObject *target = PyObject_GetAttr(member, s_linkname);
        failed = target == NULL || add_text(&out->strings, target, &link_len) < 0;
        Py_XDECREF(target);
        if (failed)
            goto done;
    }
    /* A hardlink's uoff is its own place in the stream (just after its header): the tar
     * order of links, which decides the shared inode's owner (docs/erofs.md). */
    if (etype == TYPE_HARDLINK
        && int_field(member, s_uoff, 0, UINT64_MAX, member, error, &uoff) < 0)
        goto done;
    if (etype == TYPE_FILE) {
        if (int_field(member, s_size, 0, UINT64_MAX, member, error, &size) < 0
            || int_field(member, s_uoff, 0, UINT64_MAX, member, error, &uoff) < 0)
            goto done;
        PyObject *digests = PyObject_GetAttr(member, s_digests);
        failed = digests == NULL || !PyBytes_Check(digests)
                 || PyBytes_GET_SIZE(digests) % DIGEST != 0;
        if (!failed) {
            failed = buffer_add(&out->digests, PyBytes_AS_STRING(digests),
                                (size_t)PyBytes_GET_SIZE(digests)) < 0;
            out->digest_count += PyBytes_GET_SIZE(digests) / DIGEST;
        }
        if (failed && !PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError,
                            "encode_tree: digests are bytes, 32 per chunk");
        Py_XDECREF(digests);
        if (failed)
            goto done;
    }
    mode &= 07777;
    r[18] = (unsigned char)(mode & 0xFF);
    r[19] = (unsigned char)(mode >> 8);
    put32(r + 20, (uint32_t)uid);
    put32(r + 24, (uint32_t)gid);
    put64(r + 28, size);
    put64(r + 36, mtime);
    put64(r + 44, uoff);
    put32(r + 52, (uint32_t)link_off);
    put32(r + 56, (uint32_t)link_len);
    put32(r + 68, (uint32_t)major);
    put32(r + 72, (uint32_t)minor);
    put32(r + 80, (uint32_t)(out->xattr_count - x_first));
    result = buffer_add(&out->records, r, ENTRY_SIZE);
done:
    Py_XDECREF(type);
    Py_XDECREF(name);
    Py_XDECREF(link);
    Py_XDECREF(member);
    Py_XDECREF(links);
    return result;
}

PyDoc_STRVAR(encode_tree_doc,
"encode_tree(root, leaf, error) -> (count, records, xattrs, xattr_count, digests,\n"
"    digest_count, strings)\n\n"
"Number the tree's nodes breadth-first from ``root`` (siblings by name bytes, so every\n"
"directory's children are one contiguous run), encode every node's entry record, xattr\n"
"records, digests and strings as format.py lays them out, breaking the tree's reference\n"
"cycles (parent, link, links set to None, children to ``leaf``) so reference counting frees\n"
"it: each node once encoded, those a hardlink involves at the end.\n"
"A value that does not fit its record field raises ``error`` naming the entry.");

/* Break a node's reference cycles (parent <-> children, hardlink <-> target). */
static int
release_node(PyObject *node, PyObject *leaf)
{
    if (PyObject_SetAttr(node, s_parent, Py_None) < 0
        || PyObject_SetAttr(node, s_link, Py_None) < 0
        || PyObject_SetAttr(node, s_links, Py_None) < 0
        || PyObject_SetAttr(node, s_children, leaf) < 0)
        return -1;
    return 0;
}

/* 1 when no hardlink involves the node (its link and links are None), 0 if one does, -1 on
 * error. */
static int
is_plain_node(PyObject *node)
{
    PyObject *link = PyObject_GetAttr(node, s_link);
    if (link == NULL)
        return -1;
    PyObject *links = PyObject_GetAttr(node, s_links);
    int plain = links == NULL ? -1 : link == Py_None && links == Py_None;
    Py_DECREF(link);
    Py_XDECREF(links);
    return plain;
}

static PyObject *
encode_tree(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "encode_tree(root, leaf, error)");
        return NULL;
    }
    if (intern_names() < 0)
        return NULL;
    PyObject *root = args[0], *leaf = args[1], *error = args[2];
    Py_ssize_t capacity = 1024, count = 1;
    PyObject **nodes = PyMem_Malloc(sizeof(PyObject *) * (size_t)capacity);
    Py_ssize_t *meta = PyMem_Malloc(sizeof(Py_ssize_t) * 4 * (size_t)capacity);
    encoded out = {{NULL, NULL, 0, 0}, {NULL, NULL, 0, 0}, {NULL, NULL, 0, 0},
                   {NULL, NULL, 0, 0}, 0, 0};
    PyObject *result = NULL, *zero = NULL;
    if (nodes == NULL || meta == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    nodes[0] = Py_NewRef(root);
    zero = PyLong_FromLong(0);
    if (zero == NULL || PyObject_SetAttr(root, s_ordinal, zero) < 0)
        goto done;
    meta[0] = 0; /* parent, first child, child count, subdirectories */
    meta[1] = meta[2] = meta[3] = 0;
    /* breadth-first numbering: ``nodes`` grows while it is walked */
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *children = PyObject_GetAttr(nodes[i], s_children);
        if (children == NULL || !PyDict_Check(children)) {
            if (children != NULL)
                PyErr_SetString(PyExc_TypeError, "encode_tree: children is a dict");
            Py_XDECREF(children);
            goto done;
        }
        PyObject *keys = PyDict_Keys(children);
        if (keys == NULL || PyList_Sort(keys) < 0) {
            Py_XDECREF(keys);
            Py_DECREF(children);
            goto done;
        }
        Py_ssize_t n = PyList_GET_SIZE(keys), subdirs = 0;
        meta[4 * i + 1] = n ? count : 0;
        meta[4 * i + 2] = n;
        if (count + n > capacity) {
            while (capacity < count + n)
                capacity *= 2;
            PyObject **more_nodes = PyMem_Realloc(nodes, sizeof(PyObject *) * (size_t)capacity);
            if (more_nodes != NULL)
                nodes = more_nodes;
            Py_ssize_t *more_meta = PyMem_Realloc(meta, sizeof(Py_ssize_t) * 4 * (size_t)capacity);
            if (more_meta != NULL)
                meta = more_meta;
            if (more_nodes == NULL || more_meta == NULL) {
                PyErr_NoMemory();
                Py_DECREF(keys);
                Py_DECREF(children);
                goto done;
            }
        }
        int failed = 0;
        for (Py_ssize_t k = 0; k < n && !failed; k++) {
            PyObject *key = PyList_GET_ITEM(keys, k);
            PyObject *child = PyDict_GetItemWithError(children, key);
            PyObject *ordinal = NULL, *type = NULL;
            if (child == NULL || !PyBytes_Check(key)) {
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_TypeError, "encode_tree: names are bytes");
                failed = 1;
                break;
            }
            ordinal = PyLong_FromSsize_t(count);
            type = PyObject_GetAttr(child, s_type);
            failed = ordinal == NULL || type == NULL
                     || PyObject_SetAttr(child, s_ordinal, ordinal) < 0;
            if (!failed) {
                long etype = PyLong_AsLong(type);
                failed = etype == -1 && PyErr_Occurred();
                subdirs += etype == TYPE_DIR;
                nodes[count] = Py_NewRef(child);
                meta[4 * count] = i;
                meta[4 * count + 1] = meta[4 * count + 2] = meta[4 * count + 3] = 0;
                count++;
            }
            Py_XDECREF(ordinal);
            Py_XDECREF(type);
        }
        meta[4 * i + 3] = subdirs;
        Py_DECREF(keys);
        Py_DECREF(children);
        if (failed)
            goto done;
    }
    /* A node no hardlink involves is released once encoded, so the tree shrinks while the
     * records grow. Later nodes read a hardlink target's ordinal and links: those nodes stay
     * until the end. */
    for (Py_ssize_t i = 0; i < count; i++) {
        if (encode_node(&out, nodes[i], i, meta[4 * i], meta[4 * i + 1], meta[4 * i + 2],
                        meta[4 * i + 3], error) < 0)
            goto done;
        int plain = is_plain_node(nodes[i]);
        if (plain < 0 || (plain && release_node(nodes[i], leaf) < 0))
            goto done;
        if (plain)
            Py_CLEAR(nodes[i]);
    }
    PyObject *records = buffer_take(&out.records), *xattrs = buffer_take(&out.xattrs);
    PyObject *digests = buffer_take(&out.digests), *strings = buffer_take(&out.strings);
    if (records != NULL && xattrs != NULL && digests != NULL && strings != NULL)
        result = Py_BuildValue("(nOOnOnO)", count, records, xattrs, out.xattr_count, digests,
                               out.digest_count, strings);
    Py_XDECREF(records);
    Py_XDECREF(xattrs);
    Py_XDECREF(digests);
    Py_XDECREF(strings);
done:
    if (nodes != NULL) {
        for (Py_ssize_t i = 0; i < count; i++) {
            /* break the cycles: refcounting frees the tree */
            if (result != NULL && nodes[i] != NULL && release_node(nodes[i], leaf) < 0)
                Py_CLEAR(result);
            Py_XDECREF(nodes[i]);
        }
    }
    PyMem_Free(nodes);
    PyMem_Free(meta);
    Py_XDECREF(out.records.bytes);
    Py_XDECREF(out.xattrs.bytes);
    Py_XDECREF(out.digests.bytes);
    Py_XDECREF(out.strings.bytes);
    Py_XDECREF(zero);
    return result;
}

/* ---- module -------------------------------------------------------------------------- */

static PyMethodDef native_methods[] = {
    {"inflate_blocks", inflate_blocks, METH_VARARGS, inflate_blocks_doc},
    {"new_piece", new_piece, METH_O, new_piece_doc},
    {"digest_files", (PyCFunction)(void (*)(void))digest_files, METH_FASTCALL,
     digest_files_doc},
    {"encode_tree", (PyCFunction)(void (*)(void))encode_tree, METH_FASTCALL,
     encode_tree_doc},
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
    PyObject *module = PyModule_Create(&native_module);
    /* inflate.py reads the bound layout from here rather than repeating it */
    if (module != NULL && PyModule_AddIntConstant(module, "BOUND_FIELDS", BOUND_FIELDS) < 0)
        Py_CLEAR(module);
    return module;
}
