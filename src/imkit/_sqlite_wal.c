/* imkit._sqlite_wal: a SQLite VFS that writes a WAL commit in one system call.
 *
 * SQLite appends a commit to the write-ahead log one frame at a time, two pwrite()
 * calls per frame (a 24-byte header, then the page), and syncs the log once at the
 * end. A write round of imkit's SQLite store touches ~200 pages: ~400 system calls,
 * each paying the kernel's per-call cost (the file system's write path, the page
 * cache lookups) for a few KiB. This VFS wraps the default one: the files of a
 * database are the default VFS's files, and a write-ahead log's writes that follow
 * one another are gathered in memory and written by one call when anything else
 * happens to the log (a sync, a read, a truncate, its size asked, a file control, a
 * write elsewhere, the close) or the buffer is full.
 *
 * When this is safe: SQLite makes a commit visible to other connections by updating
 * the WAL index (shared memory) after writing its frames. With synchronous=FULL (or
 * EXTRA) it syncs the log before that update, and the sync writes the buffer first:
 * no connection can see a frame that is not in the file. With synchronous=NORMAL or
 * OFF there is no sync at commit, so a connection using this VFS must run with FULL
 * or EXTRA: imkit's SQLite store uses it only then. Nothing changes on disk: the
 * file is an ordinary SQLite database and log, which any other connection or process
 * may open with the default VFS. A write error surfaces at the sync (or whatever
 * flushed the buffer), which fails the commit: nothing is reported stored that was
 * not written.
 *
 * The extension does not link SQLite: register() takes the path of the loaded
 * _sqlite3 module and finds sqlite3_vfs_find / sqlite3_vfs_register in it (or in
 * the SQLite library it links), so the VFS is registered with the very SQLite that
 * Python's sqlite3 module uses. Only the header is needed to build.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>

#define VFS_NAME "imkit-wal"
#define BUFFER_START (64 * 1024)
#define BUFFER_MAX (8 * 1024 * 1024) /* a write that would pass this flushes first */
/* The most one write of the gathered bytes hands the default VFS: the unix VFS writes
 * at most 128 KiB - 1 bytes per call (it masks the length to 17 bits). */
#define CHUNK (124 * 1024)

typedef struct {
    sqlite3_file base;  /* pMethods: walfile_methods */
    sqlite3_file *real; /* the default VFS's file: the memory right after this struct */
    int wal;            /* a write-ahead log: its writes are gathered */
    int len;            /* bytes gathered, from offset */
    int cap;
    int unused;
    sqlite3_int64 offset;
    unsigned char *buffer;
} WalFile;

static sqlite3_vfs *real_vfs = NULL;
static sqlite3_vfs wal_vfs;
static unsigned long long writes_seen = 0;   /* log writes SQLite asked for */
static unsigned long long writes_issued = 0; /* log writes made to the real file */
static unsigned long long journals_opened = 0; /* statement/savepoint journal files */

#define REAL(p) (((WalFile *)(p))->real)
#define RM(p) (REAL(p)->pMethods)

static void count(unsigned long long *counter) {
    __atomic_add_fetch(counter, 1, __ATOMIC_RELAXED);
}

/* Write what is gathered (the buffer is empty afterwards, whatever the outcome: a
 * failed write fails the commit, and SQLite writes the frames again on retry). */
static int flush(WalFile *f) {
    if (f->len == 0) {
        return SQLITE_OK;
    }
    int len = f->len;
    f->len = 0;
    for (int done = 0; done < len; done += CHUNK) {
        int n = len - done < CHUNK ? len - done : CHUNK;
        count(&writes_issued);
        int rc = f->real->pMethods->xWrite(f->real, f->buffer + done, n, f->offset + done);
        if (rc != SQLITE_OK) {
            return rc;
        }
    }
    return SQLITE_OK;
}

static int w_close(sqlite3_file *p) {
    WalFile *f = (WalFile *)p;
    int rc = flush(f);
    int rc2 = RM(p)->xClose(REAL(p));
    free(f->buffer);
    f->buffer = NULL;
    f->cap = 0;
    return rc != SQLITE_OK ? rc : rc2;
}

static int w_read(sqlite3_file *p, void *out, int amount, sqlite3_int64 offset) {
    int rc = flush((WalFile *)p);
    if (rc != SQLITE_OK) {
        return rc;
    }
    return RM(p)->xRead(REAL(p), out, amount, offset);
}

/* Room for `need` bytes in the buffer; 0 if memory ran out (the caller writes
 * through instead). */
static int reserve(WalFile *f, int need) {
    if (need <= f->cap) {
        return 1;
    }
    int cap = f->cap ? f->cap : BUFFER_START;
    while (cap < need) {
        cap *= 2;
    }
    unsigned char *grown = realloc(f->buffer, (size_t)cap);
    if (grown == NULL) {
        return 0;
    }
    f->buffer = grown;
    f->cap = cap;
    return 1;
}

static int w_write(sqlite3_file *p, const void *data, int amount, sqlite3_int64 offset) {
    WalFile *f = (WalFile *)p;
    if (!f->wal) {
        return RM(p)->xWrite(REAL(p), data, amount, offset);
    }
    count(&writes_seen);
    if (f->len > 0 && offset == f->offset + f->len && f->len + amount <= BUFFER_MAX &&
        reserve(f, f->len + amount)) {
        memcpy(f->buffer + f->len, data, (size_t)amount);
        f->len += amount;
        return SQLITE_OK;
    }
    int rc = flush(f); /* (a write elsewhere: what is gathered goes first) */
    if (rc != SQLITE_OK) {
        return rc;
    }
    if (amount > CHUNK || !reserve(f, amount)) {
        count(&writes_issued);
        return RM(p)->xWrite(REAL(p), data, amount, offset);
    }
    memcpy(f->buffer, data, (size_t)amount);
    f->offset = offset;
    f->len = amount;
    return SQLITE_OK;
}

static int w_truncate(sqlite3_file *p, sqlite3_int64 size) {
    int rc = flush((WalFile *)p);
    return rc != SQLITE_OK ? rc : RM(p)->xTruncate(REAL(p), size);
}

static int w_sync(sqlite3_file *p, int flags) {
    int rc = flush((WalFile *)p);
    return rc != SQLITE_OK ? rc : RM(p)->xSync(REAL(p), flags);
}

static int w_file_size(sqlite3_file *p, sqlite3_int64 *size) {
    int rc = flush((WalFile *)p);
    return rc != SQLITE_OK ? rc : RM(p)->xFileSize(REAL(p), size);
}

static int w_lock(sqlite3_file *p, int level) {
    return RM(p)->xLock(REAL(p), level);
}

static int w_unlock(sqlite3_file *p, int level) {
    return RM(p)->xUnlock(REAL(p), level);
}

static int w_check_reserved_lock(sqlite3_file *p, int *out) {
    return RM(p)->xCheckReservedLock(REAL(p), out);
}

static int w_file_control(sqlite3_file *p, int op, void *arg) {
    int rc = flush((WalFile *)p);
    return rc != SQLITE_OK ? rc : RM(p)->xFileControl(REAL(p), op, arg);
}

static int w_sector_size(sqlite3_file *p) {
    return RM(p)->xSectorSize(REAL(p));
}

static int w_device_characteristics(sqlite3_file *p) {
    return RM(p)->xDeviceCharacteristics(REAL(p));
}

static int w_shm_map(sqlite3_file *p, int page, int size, int extend, void volatile **out) {
    if (RM(p)->iVersion < 2) {
        return SQLITE_IOERR_SHMMAP;
    }
    return RM(p)->xShmMap(REAL(p), page, size, extend, out);
}

static int w_shm_lock(sqlite3_file *p, int offset, int n, int flags) {
    if (RM(p)->iVersion < 2) {
        return SQLITE_IOERR_SHMLOCK;
    }
    return RM(p)->xShmLock(REAL(p), offset, n, flags);
}

static void w_shm_barrier(sqlite3_file *p) {
    if (RM(p)->iVersion >= 2) {
        RM(p)->xShmBarrier(REAL(p));
    }
}

static int w_shm_unmap(sqlite3_file *p, int delete_flag) {
    if (RM(p)->iVersion < 2) {
        return SQLITE_OK;
    }
    return RM(p)->xShmUnmap(REAL(p), delete_flag);
}

static int w_fetch(sqlite3_file *p, sqlite3_int64 offset, int amount, void **out) {
    if (RM(p)->iVersion < 3) {
        *out = NULL;
        return SQLITE_OK;
    }
    return RM(p)->xFetch(REAL(p), offset, amount, out);
}

static int w_unfetch(sqlite3_file *p, sqlite3_int64 offset, void *page) {
    if (RM(p)->iVersion < 3) {
        return SQLITE_OK;
    }
    return RM(p)->xUnfetch(REAL(p), offset, page);
}

static const sqlite3_io_methods walfile_methods = {
    3,
    w_close,
    w_read,
    w_write,
    w_truncate,
    w_sync,
    w_file_size,
    w_lock,
    w_unlock,
    w_check_reserved_lock,
    w_file_control,
    w_sector_size,
    w_device_characteristics,
    w_shm_map,
    w_shm_lock,
    w_shm_barrier,
    w_shm_unmap,
    w_fetch,
    w_unfetch,
};

/* -- the VFS: the default one's methods, with files opened through WalFile -- */

static int v_open(sqlite3_vfs *vfs, sqlite3_filename name, sqlite3_file *p, int flags,
                  int *out_flags) {
    (void)vfs;
    WalFile *f = (WalFile *)p;
    memset(f, 0, sizeof *f);
    f->real = (sqlite3_file *)(f + 1);
    int rc = real_vfs->xOpen(real_vfs, name, f->real, flags, out_flags);
    /* SQLite closes a file whose pMethods is set, even when xOpen failed */
    p->pMethods = f->real->pMethods ? &walfile_methods : NULL;
    f->wal = (flags & SQLITE_OPEN_WAL) != 0;
    if (flags & (SQLITE_OPEN_SUBJOURNAL | SQLITE_OPEN_TEMP_JOURNAL)) {
        count(&journals_opened);
    }
    return rc;
}

static int v_delete(sqlite3_vfs *vfs, const char *name, int sync_dir) {
    (void)vfs;
    return real_vfs->xDelete(real_vfs, name, sync_dir);
}

static int v_access(sqlite3_vfs *vfs, const char *name, int flags, int *out) {
    (void)vfs;
    return real_vfs->xAccess(real_vfs, name, flags, out);
}

static int v_full_pathname(sqlite3_vfs *vfs, const char *name, int n, char *out) {
    (void)vfs;
    return real_vfs->xFullPathname(real_vfs, name, n, out);
}

static void *v_dl_open(sqlite3_vfs *vfs, const char *name) {
    (void)vfs;
    return real_vfs->xDlOpen(real_vfs, name);
}

static void v_dl_error(sqlite3_vfs *vfs, int n, char *out) {
    (void)vfs;
    real_vfs->xDlError(real_vfs, n, out);
}

static void (*v_dl_sym(sqlite3_vfs *vfs, void *handle, const char *symbol))(void) {
    (void)vfs;
    return real_vfs->xDlSym(real_vfs, handle, symbol);
}

static void v_dl_close(sqlite3_vfs *vfs, void *handle) {
    (void)vfs;
    real_vfs->xDlClose(real_vfs, handle);
}

static int v_randomness(sqlite3_vfs *vfs, int n, char *out) {
    (void)vfs;
    return real_vfs->xRandomness(real_vfs, n, out);
}

static int v_sleep(sqlite3_vfs *vfs, int microseconds) {
    (void)vfs;
    return real_vfs->xSleep(real_vfs, microseconds);
}

static int v_current_time(sqlite3_vfs *vfs, double *out) {
    (void)vfs;
    return real_vfs->xCurrentTime(real_vfs, out);
}

static int v_get_last_error(sqlite3_vfs *vfs, int n, char *out) {
    (void)vfs;
    return real_vfs->xGetLastError ? real_vfs->xGetLastError(real_vfs, n, out) : 0;
}

static int v_current_time_int64(sqlite3_vfs *vfs, sqlite3_int64 *out) {
    (void)vfs;
    return real_vfs->xCurrentTimeInt64(real_vfs, out);
}

static int v_set_system_call(sqlite3_vfs *vfs, const char *name, sqlite3_syscall_ptr fn) {
    (void)vfs;
    return real_vfs->xSetSystemCall(real_vfs, name, fn);
}

static sqlite3_syscall_ptr v_get_system_call(sqlite3_vfs *vfs, const char *name) {
    (void)vfs;
    return real_vfs->xGetSystemCall(real_vfs, name);
}

static const char *v_next_system_call(sqlite3_vfs *vfs, const char *name) {
    (void)vfs;
    return real_vfs->xNextSystemCall(real_vfs, name);
}

/* -- Python -- */

typedef sqlite3_vfs *(*vfs_find_fn)(const char *);
typedef int (*vfs_register_fn)(sqlite3_vfs *, int);

static PyObject *py_register(PyObject *module, PyObject *arg) {
    (void)module;
    if (!PyUnicode_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "register() takes the path of the _sqlite3 module");
        return NULL;
    }
    const char *path = PyUnicode_AsUTF8(arg);
    if (path == NULL) {
        return NULL;
    }
    /* The module is loaded already: this finds it, and dlsym searches what it links. */
    void *handle = dlopen(path, RTLD_LAZY | RTLD_NOLOAD);
    if (handle == NULL) {
        Py_RETURN_FALSE;
    }
    vfs_find_fn find = (vfs_find_fn)dlsym(handle, "sqlite3_vfs_find");
    vfs_register_fn reg = (vfs_register_fn)dlsym(handle, "sqlite3_vfs_register");
    dlclose(handle); /* (RTLD_NOLOAD took a reference; the module stays loaded) */
    if (find == NULL || reg == NULL) {
        Py_RETURN_FALSE;
    }
    if (real_vfs != NULL) { /* registered before: with this SQLite? */
        return PyBool_FromLong(find(VFS_NAME) == &wal_vfs);
    }
    sqlite3_vfs *below = find(NULL);
    if (below == NULL || below->iVersion < 1 || find(VFS_NAME) != NULL) {
        Py_RETURN_FALSE;
    }
    memset(&wal_vfs, 0, sizeof wal_vfs);
    wal_vfs.iVersion = below->iVersion < 3 ? below->iVersion : 3;
    wal_vfs.szOsFile = (int)sizeof(WalFile) + below->szOsFile;
    wal_vfs.mxPathname = below->mxPathname;
    wal_vfs.zName = VFS_NAME;
    wal_vfs.xOpen = v_open;
    wal_vfs.xDelete = v_delete;
    wal_vfs.xAccess = v_access;
    wal_vfs.xFullPathname = v_full_pathname;
    wal_vfs.xDlOpen = below->xDlOpen ? v_dl_open : NULL;
    wal_vfs.xDlError = below->xDlError ? v_dl_error : NULL;
    wal_vfs.xDlSym = below->xDlSym ? v_dl_sym : NULL;
    wal_vfs.xDlClose = below->xDlClose ? v_dl_close : NULL;
    wal_vfs.xRandomness = v_randomness;
    wal_vfs.xSleep = v_sleep;
    wal_vfs.xCurrentTime = v_current_time;
    wal_vfs.xGetLastError = v_get_last_error;
    if (wal_vfs.iVersion >= 2) {
        wal_vfs.xCurrentTimeInt64 = below->xCurrentTimeInt64 ? v_current_time_int64 : NULL;
    }
    if (wal_vfs.iVersion >= 3) {
        wal_vfs.xSetSystemCall = below->xSetSystemCall ? v_set_system_call : NULL;
        wal_vfs.xGetSystemCall = below->xGetSystemCall ? v_get_system_call : NULL;
        wal_vfs.xNextSystemCall = below->xNextSystemCall ? v_next_system_call : NULL;
    }
    real_vfs = below;
    if (reg(&wal_vfs, 0) != SQLITE_OK) {
        real_vfs = NULL;
        Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

static PyObject *py_counts(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
    return Py_BuildValue(
        "(KKK)", __atomic_load_n(&writes_seen, __ATOMIC_RELAXED),
        __atomic_load_n(&writes_issued, __ATOMIC_RELAXED),
        __atomic_load_n(&journals_opened, __ATOMIC_RELAXED));
}

static PyMethodDef methods[] = {
    {"register", py_register, METH_O,
     "register(sqlite3_module_path, /) -> bool\n\n"
     "Register the VFS (named VFS_NAME) with the SQLite that the loaded module at the\n"
     "path uses. False if that module is not loaded, SQLite's functions cannot be found\n"
     "in it, or the VFS is registered with another SQLite already. Idempotent."},
    {"counts", py_counts, METH_NOARGS,
     "counts() -> (writes_seen, writes_issued, journals_opened)\n\n"
     "Since the module was loaded, over all connections: the write-ahead-log writes\n"
     "SQLite asked this VFS for, those it made to the files, and the statement or\n"
     "savepoint journal files opened through it."},
    {NULL, NULL, 0, NULL},
};

static int exec_module(PyObject *module) {
    return PyModule_AddStringConstant(module, "VFS_NAME", VFS_NAME);
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, exec_module},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "imkit._sqlite_wal",
    "A SQLite VFS that writes a write-ahead-log commit in one system call.",
    0,
    methods,
    slots,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__sqlite_wal(void) {
    return PyModuleDef_Init(&module_def);
}
