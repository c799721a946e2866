/*
 * fswatchaudit kernel side: tracepoint programs that filter filesystem operations
 * against a map of watched inodes and send the matching ones through a ring buffer.
 *
 * Only tracepoints are used (raw sys_enter/sys_exit, the timestamp:* inode ctime
 * tracepoints, sched, io_uring), so this loads on kernels without kprobes, fentry or
 * BPF-LSM.  Every kernel struct offset (OFF_*) is computed at start-up from the running
 * kernel's BTF and passed in with -D; nothing here depends on kernel headers.  What user
 * space shares with this file (struct event, struct syscall_spec, EV_*, CNT_*, PERM_*,
 * KIND_*, MOVES_*, GEN_*, AUDIT_*, OFLAG_*) is defined in abi.py, and the C text
 * generated from it is prepended to this file when it is compiled.
 *
 * Flow of one syscall:
 *   sys_enter    -> remember a filesystem syscall's arguments for this thread (pending)
 *   timestamp:*  -> remember which inodes the syscall changed (their ctime moved)
 *   sys_exit     -> if a changed inode, or the opened file, lies under a watch whose
 *                   permission mask covers the operation, build a record and submit it
 *
 * "Under a watch" is decided by walking up d_parent (WATCH_DEPTH levels, continued in
 * tail calls beyond: deep_walk) at the time of the operation, so new and moved
 * directories are covered at once; the answer for each directory is kept in dir_cache
 * until a directory moves or the watches change.
 * The raw syscall tracepoints fire for every syscall of every process: whatever is not
 * a followed filesystem syscall leaves at the first array lookup.
 */

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

/* ---- named constants ------------------------------------------------------------ */
#define MAX_TOUCHED     4       /* inodes remembered per syscall (rename: 3) */
#define MAX_ALIASES     4       /* names of a hard-linked file judged (its dentries) */
#define WATCH_DEPTH     16      /* directory levels walked up looking for a watch or a
                                 * directory judged before (deep_walk beyond) */
#define NAME_SLOT       256     /* NAME_MAX + 1 */
#define DATA_MASK       (DATA_SIZE - 1)   /* DATA_SIZE, PATH_SLOT, COMM_LEN: abi.py */
#define MAX_WATCHES     65536
#define DIR_CACHE_SIZE  65536
#define MAX_EXE_SENT    65536
#define MAX_AUDITED     65536
/* Waking the reader costs the audited process an interrupt (in a VM, an exit to the
 * hypervisor) and a cross-CPU wakeup; records are sent without one and every
 * WAKEUP_EVERY-th record on a CPU wakes the reader, which looks on its own every 10 ms
 * anyway (ringbuf.py POLL_INTERVAL): the wakeups only matter for a burst that would
 * fill the ring between two looks (176,000 records of 32 MB). */
#define WAKEUP_EVERY    1024
#define RB_NO_WAKEUP    1       /* BPF_RB_NO_WAKEUP */
#define RB_FORCE_WAKEUP 2       /* BPF_RB_FORCE_WAKEUP */

#define S_IFMT_MASK     0170000
#define S_IFDIR_BITS    0040000

/* AT_FDCWD is ABI, the same on every architecture we run on */
#define AT_FDCWD_VALUE  (-100)

/* ---- maps --------------------------------------------------------------------------- */

/* watched: (device, inode) -> permission masks by depth.  self applies to the inode
 * itself, child to its direct entries, subtree to everything further below.  A file
 * watch marks the file's own inode (self: links, bind mounts and removals reach it)
 * and its parent's entries by name (rname: the file replaced or not yet created). */
struct watch_key {
    u64 dev;                    /* super_block.s_dev, kernel encoding */
    u64 ino;
};
struct watch_val {
    u8 self;
    u8 child;
    u8 subtree;
    u8 pad[5];
    /* the rules (one bit per rule slot, RULE_SLOTS in abi.py) behind each mask: user
     * space attaches keys from them instead of matching path strings again */
    u64 rself;
    u64 rchild;
    u64 rsub;
    u64 rname;                  /* entries, but only the one a file rule names: user
                                 * space confirms the name (a file not yet created, or
                                 * replaced by a rename) */
};
BPF_HASH(watched, struct watch_key, struct watch_val, MAX_WATCHES);

/* syscall_spec: syscall number -> which arguments are paths, dirfds, fds, flags.
 * Filled by user space from the tracefs format files; -1 means "no such argument". */
/* (struct syscall_spec is in abi.py: user space fills it by member name) */
/* an array, not a hash: both raw syscall tracepoints look it up for every syscall of
 * every process, and an array lookup is a bounds check and an add */
BPF_ARRAY(syscall_spec, struct syscall_spec, SPEC_SLOTS);

/* A base directory a thread's record carried whole: the thread's next records that have
 * the same one say BASE_AS_BEFORE instead of its path (user space keeps the thread's
 * last one).  The same directory is the same dentry through the same mount, with the
 * same device and inode number (a dentry's memory may come back as another
 * directory's) and the same mount id (a mount's memory may come back as another
 * mount's), while no directory has moved or been removed and no mount has been made,
 * moved or removed (GEN_KERNEL): then its path is the same. */
struct sent_base {
    u64 dentry;
    u64 mnt;
    u64 mnt_id;                 /* the mount's id that is never reused (0: unknown) */
    u64 ino;
    u64 kgen;
    u64 dev;
    u64 valid;                  /* 0 while nothing was sent */
};

/* pending: per thread (task storage: found from the task itself, without a hash
 * lookup, and gone with the thread), the syscall in progress and the inodes it changed
 * so far.  A thread's entry stays after its syscall (active = 0) and is reused by the
 * next one. */
struct pending {
    u32 tp_id;                  /* syscall number */
    u32 ntouched;
    u64 args[6];
    u64 touched[MAX_TOUCHED];   /* struct inode *, each at most once */
    u64 touched_name[MAX_TOUCHED];  /* name_id() of each when it changed */
    u8 active;                  /* a followed syscall is in progress */
    u8 overflow;                /* it changed more than MAX_TOUCHED inodes */
    u8 judged;                  /* bit i: touched[i] was judged when it changed */
    u8 perms;                   /* what the watches grant to the inodes judged so far */
    u8 granted;                 /* bit i: the watches grant something to touched[i] */
    u8 renames;                 /* a rename or link: touched_name is kept */
    u8 scope;                   /* SCOPE_*: the thread at the syscall's entry */
    u8 dir_below;               /* what the watches grant to dir's entries */
    u64 rules;                  /* and the rule slots behind it (struct match) */
    u64 names;
    u64 dir;                    /* the one directory among the inodes changed (0: none
                                 * yet, DIRS_SEVERAL: more than one) ... */
    u64 dir_kgen;               /* ... and the generations its verdict was taken in */
    u64 dir_ugen;
    struct sent_base sent;      /* kept between syscalls (sys_enter leaves it); not
                                 * copied to ending (PENDING_COPY) */
};
#define PENDING_COPY __builtin_offsetof(struct pending, sent)
#define DIRS_SEVERAL 1
/* pending.scope: whether the thread's syscall is reported (in_scope), judged once at
 * its entry instead of at every change and at its end */
#define SCOPE_OUT       0
#define SCOPE_IN        1
#define SCOPE_ALL_PATHS 2       /* a per-process audit of everything it touches */
BPF_TASK_STORAGE(pending, struct pending);

/* The current thread's entry, or NULL (create: make one if it has none). */
static __always_inline struct pending *thread_pending(int create)
{
    return pending.task_storage_get(bpf_get_current_task_btf(), 0,
                                    create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
}
/* ending: the copy sys_exit works on (per CPU: the BPF stack has no room for it) */
BPF_PERCPU_ARRAY(ending, struct pending, 1);
/* base_written: the last base directory the record being built carries whole; the
 * thread's sent base becomes it once the record is in the ring */
BPF_PERCPU_ARRAY(base_written, struct sent_base, 1);

/* dir_cache: directory (dev, ino) -> what the watches grant to its direct entries, from
 * a walk up to its filesystem's root.  An entry holds while both generations in gens
 * are those it was computed under: GEN_KERNEL moves when a directory is moved to
 * another parent or removed (its ancestry, or whose its inode number is, changes) or a
 * filesystem is mounted (a device number may be reused), GEN_USER when user space
 * changes the watched map.  A directory renamed within its parent keeps its entries. */
struct dir_verdict {
    u64 kgen;
    u64 ugen;
    u8 own;                     /* PERM_* granted to the directory itself */
    u8 below;                   /* PERM_* granted to entries of this directory */
    u8 pad[6];
    u64 own_rules;              /* rule slots behind own and below */
    u64 below_rules;
    u64 own_names;              /* rule slots that name the directory (to confirm) */
    u64 below_names;            /* ... that name one of its entries */
    u64 deep_rules;             /* ... granted to everything two or more levels below */
    u8 deep;                    /* PERM_* granted two or more levels below */
    u8 pad2[7];
};

/* dir_near: per CPU, a direct-mapped copy of the dir_cache entries used last (an array
 * lookup is a few instructions, a hash lookup about 35 ns); slot by inode number. */
#define DIR_NEAR_SLOTS  256
struct dir_near_entry {
    struct watch_key key;
    struct dir_verdict v;
};
BPF_PERCPU_ARRAY(dir_near, struct dir_near_entry, DIR_NEAR_SLOTS);

/* What the watches say about one object: the rule slots whose object it is, and those
 * that name it (user space confirms the name). */
struct match {
    u64 rules;
    u64 names;
};
BPF_TABLE("lru_hash", struct watch_key, struct dir_verdict, dir_cache, DIR_CACHE_SIZE);
BPF_ARRAY(gens, u64, 2);

/* deep: a walk that ended short (WATCH_DEPTH levels without reaching the top or a
 * directory judged before) is continued in programs of its own, reached by tail calls
 * (deep_tail): deep_walk collects the rest of the chain up to the top or to a judged
 * directory, judges it top down, one level from the one above, keeping every level's
 * verdict in dir_cache, and then goes on with the program that asked (deep_ctime,
 * deep_open), whose walk now ends within reach.  Per CPU: a program and its tail calls
 * run on one CPU. */
#define DEEP_CHAIN      256     /* directory levels one continued walk judges
                                 * (CNT_TOO_DEEP beyond) */
#define DEEP_STEP       32      /* ... per tail call: 2 * 256 / 32 calls and the two
                                 * around them fit the kernel's limit of 33 */
#define DEEP_WALK       0       /* deep_tail slots (build.py TAIL_CALLS) */
#define DEEP_CTIME      1
#define DEEP_OPEN       2
#define DEEP_PATH       3
struct path_walk {
    void *dentry;
    void *mnt;
    void *root_dentry;          /* the task's root: a chrooted task sees paths below it */
    void *root_mnt;
};
struct deep_state {
    u64 short_dir;              /* the directory whose walk ended short (verdict_of) */
    u64 next;                   /* the next directory to collect */
    u32 n;                      /* directories collected in chain */
    u32 left;                   /* ... of them not judged yet */
    u32 then;                   /* the deep_tail slot to go on with */
    u8 have_top;                /* top holds the verdict of the level above */
    u8 gave_up;                 /* the chain was longer than DEEP_CHAIN */
    u8 pad[2];
    u64 kgen;                   /* the generations the verdicts are computed under */
    u64 ugen;
    struct dir_verdict top;
    s64 ret;                    /* deep_open: what report_open was called with */
    u64 flags;
    u64 any_object;
    u64 pathless;
    struct path_walk pw;        /* deep_path: where the record's last path goes on */
    u64 chain[DEEP_CHAIN];      /* dentries, from the start up */
};
BPF_PERCPU_ARRAY(deep, struct deep_state, 1);
BPF_PROG_ARRAY(deep_tail, 4);

/* exe_sent: tgid -> the program whose path the process's last delivered record carried.
 * Later records of the same program leave the path out (n_exe = EXE_AS_BEFORE) and user
 * space reuses it; the process's start time tells a reused tgid apart. */
struct exe_seen {
    u64 start_time;
    u64 exe_file;               /* struct file * of mm->exe_file */
};
BPF_TABLE("lru_hash", u32, struct exe_seen, exe_sent, MAX_EXE_SENT);

/* audited: tgid -> flags, for per-process audits.  AUDIT_CHILDREN: processes it forks
 * are audited too; AUDIT_ALL_PATHS: everything it touches is reported, watched or not */
BPF_HASH(audited, u32, u8, MAX_AUDITED);

/* config: single slot of global switches set by user space */
struct config {
    u32 scope_processes;        /* only audited tgids are reported */
    u32 file_watches;           /* some watch may be on a file itself (an inode rule) */
    u64 mntns;                  /* nonzero: only tasks in this mount namespace */
    u32 have_watches;           /* the watched map is non-empty */
    u32 self_tgid;              /* the auditor itself: never reported (no feedback loop) */
    u32 audits;                 /* the audited map may hold processes (per-process audits) */
    u32 pad;
};
BPF_ARRAY(config, struct config, 1);

/* ctime_tail: slot 0 holds uring_ctime, the io_uring part of the ctime tracepoints */
BPF_PROG_ARRAY(ctime_tail, 1);

/* send_tail: slot 0 holds send_event, which adds the executable's path to the record
 * being built (scratch) and sends it: verified once, not once per place that sends */
BPF_PROG_ARRAY(send_tail, 1);

/* uring_created: io_uring request -> 1 when its open created the file (the creation is
 * reported from the worker; the open's completion then is not) */
BPF_HASH(uring_created, u64, u8, 16384);

/* uring_new: worker thread id -> a new inode whose ctime was set before it had a name
 * (mkdirat, symlinkat... through io_uring); reported with its directory's change */
BPF_HASH(uring_new, u32, u64, 16384);

/* Failed syscalls (no inode changed) are judged by their names first (failed_event):
 * watched_prefix holds FNV-1a hashes of watched objects' absolute paths, watch_ancestor
 * the directories above watched objects (a relative name may lead down into one). */
/* (FAIL_SCAN, FNV_OFFSET, FNV_PRIME: abi.py) */
BPF_HASH(watched_prefix, u64, u8, MAX_WATCHES);
BPF_HASH(watch_ancestor, struct watch_key, u8, MAX_WATCHES);
#define HASH_DEPTH      32      /* components of a path argument resolved (deeper: sent) */
struct fail_buf {
    char s[FAIL_SCAN];
    u64 hs[HASH_DEPTH];         /* hash of the path's first d components */
};
BPF_PERCPU_ARRAY(fail_scratch, struct fail_buf, 1);

/* counters, per CPU: what was submitted and what the ring buffer refused (CNT_*) */
BPF_PERCPU_ARRAY(counters, u64, NCOUNTERS);

/* the record sent to user space: struct event (abi.py), a fixed header, then
 * NUL-separated strings; built in a per-CPU scratch slot */
BPF_PERCPU_ARRAY(scratch, struct event, 1);

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);

/* ---- helpers --------------------------------------------------------------------- */

/* x == 0 and x == y (x, y below 2^63), 1 or 0, without a branch: code that chooses
 * with these leaves the verifier one state to follow instead of one per combination
 * of flags.  is_zero64 takes any value (pointers, hashes). */
#define IS_ZERO(x)  (((u64)(x) - 1) >> 63)
#define IS_EQ(x, y) IS_ZERO((u64)(x) ^ (u64)(y))
/* hides a value's range from the compiler, which would turn the above into branches */
#define OPAQUE(x)   asm volatile("" : "+r"(x))

static __always_inline u64 is_zero64(u64 x)
{
    u64 neg = 0 - x;
    OPAQUE(neg);
    return ((x | neg) >> 63) ^ 1;
}

static __always_inline void count(u32 idx)
{
    u64 *c = counters.lookup(&idx);
    if (c)
        (*c)++;
}

/* ---- reading kernel memory ---------------------------------------------------------
 * By plain loads, not bpf_probe_read_kernel (a helper call, about 30 ns each; a walk
 * makes dozens).  bpf_rdonly_cast (a kfunc; build.py turns its calls into kfunc calls,
 * the verifier into a register move) makes an address a view of a struct that is one
 * open-ended u64 array (BTF_OPEN_WORDS: struct bpf_raw_tracepoint_args), which the
 * verifier lets a program read at any offset; every such load is guarded as a probe
 * read is: an address that faults, or NULL, reads as 0. */
static void *(*kernel_view)(const void *obj, u64 btf_id) = (void *)KFUNC_RDONLY_CAST;
#define READ_KERNEL(type, base, off) \
    (*(type *)kernel_view((const char *)(base) + (off), BTF_OPEN_WORDS))

static __always_inline void *read_ptr(void *base, u64 off)
{
    return READ_KERNEL(void *, base, off);
}

static __always_inline u32 read_u32(void *base, u64 off)
{
    return READ_KERNEL(u32, base, off);
}

static __always_inline u64 read_u64(void *base, u64 off)
{
    return READ_KERNEL(u64, base, off);
}

static __always_inline u16 read_u16(void *base, u64 off)
{
    return READ_KERNEL(u16, base, off);
}

static __always_inline u8 read_u8(void *base, u64 off)
{
    return READ_KERNEL(u8, base, off);
}

static __always_inline u64 task_mntns(void *task)
{
    void *nsproxy = read_ptr(task, OFF_TASK_NSPROXY);
    if (!nsproxy)
        return 0;
    void *mnt_ns = read_ptr(nsproxy, OFF_NSPROXY_MNT_NS);
    if (!mnt_ns)
        return 0;
    return read_u32(mnt_ns, OFF_MNT_NS_INUM);
}

/* The pid as the task's own pid namespace sees it (inside a container). */
static __always_inline u32 task_nspid(void *task)
{
    void *pidp = read_ptr(task, OFF_TASK_THREAD_PID);
    if (!pidp)
        return 0;
    u32 level = read_u32(pidp, OFF_PID_LEVEL);
    return read_u32(pidp, OFF_PID_NUMBERS + (u64)level * SIZEOF_UPID + OFF_UPID_NR);
}

/* Is the current task in scope (per-process audit, container)? */
static __always_inline int in_scope(struct config *cfg, u32 tgid, int *all_paths)
{
    *all_paths = 0;
    if (tgid == cfg->self_tgid)
        return 0;
    if (cfg->mntns) {
        void *task = (void *)bpf_get_current_task();
        if (task_mntns(task) != cfg->mntns)
            return 0;
    }
    /* a hash lookup costs about 40 ns: none while no process is audited */
    u8 *audit = cfg->audits ? audited.lookup(&tgid) : NULL;
    if (audit) {
        if (*audit & AUDIT_ALL_PATHS)
            *all_paths = 1;
    } else if (cfg->scope_processes) {
        return 0;
    }
    return 1;
}

/* The configuration when the current task is in scope, else NULL; its tgid and
 * whether everything it touches is reported (a per-process audit of all paths). */
static __always_inline struct config *current_scope(u32 *tgid, int *all_paths)
{
    u32 zero = 0;
    struct config *cfg = config.lookup(&zero);
    if (!cfg)
        return NULL;
    *tgid = bpf_get_current_pid_tgid() >> 32;
    if (!in_scope(cfg, *tgid, all_paths))
        return NULL;
    return cfg;
}

struct walk {
    void *dentry;
    void *mnt;                  /* NULL: stay inside the dentry's filesystem */
    u8 perms;                   /* granted to the object the walk started at */
    u8 below;                   /* granted to an entry of it (when it is a directory) */
    u8 pad[6];
    u64 rules;                  /* rule slots behind perms and below */
    u64 below_rules;
    u64 names;
    u64 below_names;
    u64 deep_rules;
    u8 deep;                    /* granted two or more levels below the start */
    u8 cached;                  /* use directories judged before (dir_cache) */
    u8 done;                    /* reached the top or a judged directory */
    u8 pad2[5];
    u64 kgen;
    u64 ugen;
};

/* Move from a dentry at the root of its mount to the mount point; 0 at the top. */
static __always_inline int cross_mount(void **dentry, void **mnt)
{
    if (!*mnt)
        return 0;
    void *mount = (char *)*mnt - OFF_MOUNT_MNT;
    void *mnt_parent = read_ptr(mount, OFF_MOUNT_MNT_PARENT);
    if (mnt_parent == mount)
        return 0;
    *dentry = read_ptr(mount, OFF_MOUNT_MNT_MOUNTPOINT);
    *mnt = (char *)mnt_parent + OFF_MOUNT_MNT;
    return 1;
}

/* The mount point of a filesystem's root reached without knowing the mount it came
 * through (a changed inode): through the filesystem's oldest mount of that root
 * dentry, its original place (a bind mount of a directory of it, or of its root, is
 * newer; crossing through one of those would lead the walk round in a loop).  From
 * 6.15 the mounts are a chain, newest first: the oldest among its first SB_MOUNTS is
 * taken.  0 at the top. */
#define SB_MOUNTS       2
static __always_inline int cross_sb_mount(void **dentry, void *sb)
{
#ifdef OFF_SB_S_MOUNTS
#ifdef OFF_MOUNT_NEXT_FOR_SB
    /* chosen without branches: one verifier state, in every step of every walk */
    u64 found = 0, at = (u64)*dentry;
    void *next = read_ptr(sb, OFF_SB_S_MOUNTS);
    for (int i = 0; i < SB_MOUNTS; i++) {
        u64 root = (u64)read_ptr(next, OFF_MOUNT_MNT + OFF_VFSMOUNT_MNT_ROOT);
        u64 hit = is_zero64(root ^ at) & (is_zero64((u64)next) ^ 1);
        OPAQUE(hit);
        found = (found & (hit - 1)) | ((u64)next & (0 - hit));
        next = read_ptr(next, OFF_MOUNT_NEXT_FOR_SB);  /* NULL: reads give NULL */
    }
    OPAQUE(found);
    void *mount = (void *)found;
#else
    void *first = read_ptr(sb, OFF_SB_S_MOUNTS);
    if (!first || first == (char *)sb + OFF_SB_S_MOUNTS)
        return 0;
    void *mount = (char *)first - OFF_MOUNT_MNT_INSTANCE;
#endif
    if (!mount)
        return 0;
    void *mnt_parent = read_ptr(mount, OFF_MOUNT_MNT_PARENT);
    if (!mnt_parent || mnt_parent == mount)
        return 0;
    *dentry = read_ptr(mount, OFF_MOUNT_MNT_MOUNTPOINT);
    return *dentry != NULL;
#else
    return 0;
#endif
}

/* Combine what a directory judged before grants, at depth levels above the start. */
static __always_inline void use_verdict(u32 depth, struct walk *w, struct dir_verdict *c)
{
    if (depth == 1) {
        w->perms |= c->below;
        w->rules |= c->below_rules;
        w->names |= c->below_names;
    } else {
        w->perms |= c->deep;
        w->rules |= c->deep_rules;
        w->below |= c->deep;
        w->below_rules |= c->deep_rules;
    }
    if (depth == 1) {
        w->below |= c->deep;
        w->below_rules |= c->deep_rules;
    }
    w->deep |= c->deep;
    w->deep_rules |= c->deep_rules;
}

/* Move a walk from dentry (its filesystem's super_block sb, if known) to the next
 * directory up, across mount points; 1 at the top.  by_mnt (a constant): the walk
 * knows the mount it came through (w->mnt), else it crosses a filesystem's root
 * through the filesystem's mounts (only one of the two ways is compiled in, so the
 * verifier follows one). */
static __always_inline long walk_up(struct walk *w, void *dentry, void *sb,
                                    const int by_mnt)
{
    void *parent = read_ptr(dentry, OFF_DENTRY_D_PARENT);
    int at_top = parent == dentry ||
                 (by_mnt && w->mnt && dentry == read_ptr(w->mnt, OFF_VFSMOUNT_MNT_ROOT));
    if (at_top) {
        if (by_mnt) {
            void *mnt = w->mnt;
            if (!cross_mount(&dentry, &mnt)) {
                w->done = 1;
                return 1;
            }
            w->mnt = mnt;
        } else if (!sb || !cross_sb_mount(&dentry, sb)) {
            /* a filesystem mounted below a watch is covered by it */
            w->done = 1;
            return 1;
        }
        /* the mount point is the same directory: step past it too */
        parent = read_ptr(dentry, OFF_DENTRY_D_PARENT);
        if (parent == dentry) {
            w->done = 1;
            return 1;
        }
    }
    w->dentry = parent;
    return 0;
}

static __always_inline long watch_step(u32 depth, struct walk *w, const int by_mnt)
{
    void *dentry = w->dentry;
    if (!dentry) {
        w->done = 1;
        return 1;
    }
    void *inode = read_ptr(dentry, OFF_DENTRY_D_INODE);
    void *sb = NULL;
    if (inode) {
        struct watch_key key = {};
        sb = read_ptr(inode, OFF_INODE_I_SB);
        key.dev = read_u32(sb, OFF_SB_S_DEV);
        key.ino = read_u64(inode, OFF_INODE_I_INO);
        if (w->cached && depth > 0) {
            struct dir_verdict *c = dir_cache.lookup(&key);
            if (c && c->kgen == w->kgen && c->ugen == w->ugen) {
                use_verdict(depth, w, c);
                w->done = 1;
                return 1;
            }
        }
        struct watch_val *v = watched.lookup(&key);
        if (v) {
            w->deep |= v->subtree;
            w->deep_rules |= v->rsub;
            if (depth == 0) {
                w->perms |= v->self;
                w->below |= v->child | v->subtree;
                w->rules |= v->rself;
                w->below_rules |= v->rchild | v->rsub;
                w->below_names |= v->rname;
            } else if (depth == 1) {
                w->perms |= v->child | v->subtree;
                w->below |= v->subtree;
                w->rules |= v->rchild | v->rsub;
                w->below_rules |= v->rsub;
                w->names |= v->rname;
            } else {
                w->perms |= v->subtree;
                w->below |= v->subtree;
                w->rules |= v->rsub;
                w->below_rules |= v->rsub;
            }
        }
    }
    return walk_up(w, dentry, sb, by_mnt);
}

/* The dentry of an inode (its first alias; directories have exactly one). */
static __always_inline void *inode_dentry(void *inode)
{
    void *first = read_ptr(inode, OFF_INODE_I_DENTRY);
    if (!first)
        return NULL;
    return (char *)first - OFF_DENTRY_D_ALIAS;
}

/* The members of struct inode a judgment reads. */
struct inode_head {
    void *sb;
    u64 ino;
    u32 nlink;
    u32 uid;
    u32 gid;
    u16 mode;
};

static __always_inline void inode_head(void *inode, struct inode_head *h)
{
    h->sb = read_ptr(inode, OFF_INODE_I_SB);
    h->ino = read_u64(inode, OFF_INODE_I_INO);
    h->nlink = read_u32(inode, OFF_INODE_I_NLINK);
    h->mode = read_u16(inode, OFF_INODE_I_MODE);
    h->uid = read_u32(inode, OFF_INODE_I_UID);
    h->gid = read_u32(inode, OFF_INODE_I_GID);
}

static __always_inline void inode_key(void *inode, struct watch_key *key)
{
    key->dev = read_u32(read_ptr(inode, OFF_INODE_I_SB), OFF_SB_S_DEV);
    key->ino = read_u64(inode, OFF_INODE_I_INO);
}

static __always_inline u64 gen(u32 which)
{
    u64 *g = gens.lookup(&which);
    return g ? *g : 0;
}

static __always_inline void bump_kernel_gen(void)
{
    u32 which = GEN_KERNEL;
    u64 *g = gens.lookup(&which);
    if (g)
        __sync_fetch_and_add(g, 1);
}

static __always_inline int is_dir(void *inode)
{
    return (read_u16(inode, OFF_INODE_I_MODE) & S_IFMT_MASK) == S_IFDIR_BITS;
}

static __always_inline struct deep_state *deep_state(void)
{
    u32 zero = 0;
    return deep.lookup(&zero);
}

/* Whether a walk ended short since the last call (the note is taken). */
static __always_inline int deep_taken(void)
{
    struct deep_state *s = deep_state();
    if (!s || !s->short_dir)
        return 0;
    s->short_dir = 0;
    return 1;
}

/* Where a walk that ended short is not continued: counted as lost. */
static __always_inline void deep_count(void)
{
    if (deep_taken())
        count(CNT_TOO_DEEP);
}

/* If a walk ended short: continue it (deep_walk), then go on in deep_tail slot then.
 * Returns only when no walk ended short, or when the tail call failed (the kernel's
 * limit of tail calls reached: counted as lost). */
static __always_inline void deep_defer(void *ctx, u32 then)
{
    struct deep_state *s = deep_state();
    if (!s)
        return;
    u8 gave_up = s->gave_up;
    s->gave_up = 0;
    if (!s->short_dir)
        return;
    if (gave_up) {              /* the same walk, after deep_walk gave up on it */
        s->short_dir = 0;
        count(CNT_TOO_DEEP);
        return;
    }
    s->next = s->short_dir;
    s->short_dir = 0;
    s->n = 0;
    s->left = 0;
    s->have_top = 0;
    s->then = then;
    s->kgen = gen(GEN_KERNEL);
    s->ugen = gen(GEN_USER);
    deep_tail.call(ctx, DEEP_WALK);
    count(CNT_TOO_DEEP);
}

/* What watches grant to directory dentry dir (inode dir_inode) and to its entries:
 * from dir_cache, or by walking up (across the mounts it is below) and remembering the
 * answer. */
static __always_inline int verdict_of(void *dir, void *dir_inode, struct dir_verdict *out)
{
    struct watch_key key = {};
    inode_key(dir_inode, &key);
    u64 kgen = gen(GEN_KERNEL), ugen = gen(GEN_USER);
    u32 slot = (u32)key.ino & (DIR_NEAR_SLOTS - 1);
    struct dir_near_entry *near = dir_near.lookup(&slot);
    if (near && near->key.ino == key.ino && near->key.dev == key.dev &&
        near->v.kgen == kgen && near->v.ugen == ugen) {
        *out = near->v;
        return 0;
    }
    struct dir_verdict *c = dir_cache.lookup(&key);
    if (c && c->kgen == kgen && c->ugen == ugen) {
        *out = *c;
        if (near) {
            near->key = key;
            near->v = *c;
        }
        return 0;
    }
    struct walk w = {};
    w.dentry = dir;
    w.cached = 1;
    w.kgen = kgen;
    w.ugen = ugen;
    for (u32 i = 0; i < WATCH_DEPTH; i++)
        if (watch_step(i, &w, 0))
            break;
    struct dir_verdict v = {};
    v.kgen = kgen;
    v.ugen = ugen;
    v.own = w.perms;
    v.below = w.below;
    v.deep = w.deep;
    v.own_rules = w.rules;
    v.below_rules = w.below_rules;
    v.deep_rules = w.deep_rules;
    v.own_names = w.names;
    v.below_names = w.below_names;
    if (w.done) {
        dir_cache.update(&key, &v);
        if (near) {
            near->key = key;
            near->v = v;
        }
    } else {
        /* judged on the levels walked, not kept: the caller continues the walk
         * (deep_defer) or counts it as lost (deep_count) */
        struct deep_state *s = deep_state();
        if (s)
            s->short_dir = (u64)dir;
    }
    *out = v;
    return 0;
}

/* Perms for an object inside its filesystem: a directory's verdict, or a file's own
 * watch (inode and file rules put one there) and what its directory grants, for each
 * of its names (a hard link made in an unwatched directory cannot take a file out of a
 * watched tree; every_name: a changed inode, not one reached through a known name);
 * the rule slots behind them are added to *m.  One loop with one verdict_of in it: the
 * walk is inlined once. */
static __always_inline u8 object_perms(void *inode, void *dentry, struct match *m,
                                       const int every_name, u8 *dir_below)
{
    u8 perms = 0;
    u32 zero = 0;
    struct config *cfg = config.lookup(&zero);
    int dir = is_dir(inode);
    if (!dentry || (!dir && cfg && cfg->file_watches)) {
        struct watch_key key = {};
        inode_key(inode, &key);
        struct watch_val *own = watched.lookup(&key);
        if (own) {
            perms = own->self;
            m->rules |= own->rself;
        }
    }
    if (!dentry)
        return perms;
    /* the names to judge: the directory itself, or the file's name (every one of them
     * when it has several links) */
    int aliases = every_name && !dir && read_u32(inode, OFF_INODE_I_NLINK) > 1;
    void *node = aliases ? read_ptr(inode, OFF_INODE_I_DENTRY) : NULL;
    for (int i = 0; i < MAX_ALIASES; i++) {
        void *name = dentry;
        if (aliases) {
            if (!node)
                break;
            name = (char *)node - OFF_DENTRY_D_ALIAS;
            node = read_ptr(node, 0);       /* hlist_node.next */
        }
        void *judged = name, *judged_inode = inode;
        if (!dir) {
            judged = read_ptr(name, OFF_DENTRY_D_PARENT);
            if (!judged || judged == name)
                break;
            judged_inode = read_ptr(judged, OFF_DENTRY_D_INODE);
            if (!judged_inode)
                break;
        }
        struct dir_verdict v = {};
        verdict_of(judged, judged_inode, &v);
        if (dir) {
            m->rules |= v.own_rules;
            m->names |= v.own_names;
            if (dir_below)
                *dir_below = v.below;
            return v.own;
        }
        m->rules |= v.below_rules;
        m->names |= v.below_names;
        perms |= v.below;
        if (!aliases)
            break;
    }
    /* names beyond MAX_ALIASES were not judged: not silently (counted when the ones
     * judged granted nothing, so a watched later name may have been missed) */
    if (aliases && node && !perms)
        count(CNT_TOO_MANY_NAMES);
    return perms;
}

/* Perms for a changed inode (found through its first dentry). */
static __always_inline u8 inode_perms(void *inode, struct match *m)
{
    return object_perms(inode, inode_dentry(inode), m, 1, NULL);
}

/* Perms for the object at (mnt, dentry) (an opened or executed file, by each of its
 * names: one opened through a hard link made elsewhere is still judged): as inside its
 * filesystem, plus subtree watches above the mount it is reached through. */
/* mount_near: per CPU, direct-mapped by mount, what subtree watches above a mount grant
 * below it (the walk from the mount's root up across the mounts it is below: a hash
 * lookup per level), while the mounts and directories (GEN_KERNEL) and the watches
 * (GEN_USER) are as they were; a mount is told apart from one made since at the same
 * address by its never-reused id where the kernel has one. */
#define MOUNT_NEAR_SLOTS 64
struct mount_near_entry {
    u64 mnt;
    u64 mnt_id;
    u64 kgen;
    u64 ugen;
    u64 rules;
    u8 perms;
    u8 pad[7];
};
BPF_PERCPU_ARRAY(mount_near, struct mount_near_entry, MOUNT_NEAR_SLOTS);

/* A mount's id that is never reused (0 where the kernel has none). */
static __always_inline u64 mount_id(void *mnt)
{
#ifdef OFF_MOUNT_MNT_ID_UNIQUE
    return read_u64((char *)mnt - OFF_MOUNT_MNT, OFF_MOUNT_MNT_ID_UNIQUE);
#else
    return 0;
#endif
}

static __always_inline u8 watched_perms(void *dentry, void *mnt, struct match *m)
{
    void *inode = read_ptr(dentry, OFF_DENTRY_D_INODE);
    u8 perms = inode ? object_perms(inode, dentry, m, 1, NULL) : 0;
    void *mount = (char *)mnt - OFF_MOUNT_MNT;
    if (!mnt || read_ptr(mount, OFF_MOUNT_MNT_PARENT) == mount)
        return perms;           /* a top mount: nothing above it */
    u64 kgen = gen(GEN_KERNEL), ugen = gen(GEN_USER), id = mount_id(mnt);
    u32 slot = ((u64)mnt >> 6) & (MOUNT_NEAR_SLOTS - 1);
    struct mount_near_entry *near = mount_near.lookup(&slot);
    if (near && near->mnt == (u64)mnt && near->mnt_id == id && near->kgen == kgen &&
        near->ugen == ugen) {
        m->rules |= near->rules;
        return perms | near->perms;
    }
    struct walk w = {};
    w.dentry = read_ptr(mnt, OFF_VFSMOUNT_MNT_ROOT);
    w.mnt = mnt;
    for (u32 i = 2; i < WATCH_DEPTH; i++)
        if (watch_step(i, &w, 1))
            break;
    if (!w.done)
        count(CNT_TOO_DEEP);    /* a mount point deeper than the walk reaches */
    else if (near) {
        near->mnt = (u64)mnt;
        near->mnt_id = id;
        near->kgen = kgen;
        near->ugen = ugen;
        near->rules = w.rules;
        near->perms = w.perms;
    }
    m->rules |= w.rules;
    return perms | w.perms;
}


/* After a syscall that may have moved or removed a directory: expire dir_cache. */
static __always_inline void note_moves(struct pending *pc, struct syscall_spec *spec)
{
    if (spec->moves == MOVES_ALWAYS || pc->overflow) {
        bump_kernel_gen();
        return;
    }
    if (spec->flags >= 0 && (pc->args[spec->flags & 7] & AT_REMOVEDIR_FLAG)) {
        bump_kernel_gen();
        return;
    }
    int dirs = 0;
    for (int i = 0; i < MAX_TOUCHED; i++)
        if (i < pc->ntouched && is_dir((void *)pc->touched[i]))
            dirs++;
    if (dirs >= 2)
        bump_kernel_gen();
}

/* Append a string (a user path argument) at the record's write position. */
static __always_inline void put_user_str(struct event *e, const void *src)
{
    u32 off = e->data_len;
    if (off >= DATA_SIZE) {
        e->cut = 1;
        return;
    }
    int n = bpf_probe_read_user_str(&e->data[off & DATA_MASK], PATH_SLOT, src);
    if (n <= 0) {
        e->data[off & DATA_MASK] = 0;
        n = 1;
    }
    if (n >= PATH_SLOT)
        e->cut = 1;             /* longer than PATH_MAX: cut */
    e->data_len = off + n;
}

/* Appending a path, one component per step, leaf first.  The write position lives in
 * the record itself (map memory), so the verifier sees one state per step instead of
 * one per possible length of what was written so far.  (struct path_walk: above) */

static __always_inline long path_step(struct event *e, struct path_walk *w)
{
    void *dentry = w->dentry;
    if (!dentry)
        return 1;
    if (dentry == w->root_dentry && (!w->mnt || w->mnt == w->root_mnt))
        return 1;
    void *parent = read_ptr(dentry, OFF_DENTRY_D_PARENT);
    if (parent == dentry || (w->mnt && dentry == read_ptr(w->mnt, OFF_VFSMOUNT_MNT_ROOT))) {
        void *mnt = w->mnt;
        if (!cross_mount(&dentry, &mnt))
            return 1;
        w->dentry = dentry;
        w->mnt = mnt;
        return 0;
    }
    u32 off = e->data_len;
    if (off >= DATA_SIZE) {
        e->cut = 1;
        return 1;
    }
    const void *name = read_ptr(dentry, OFF_DENTRY_D_NAME + OFF_QSTR_NAME);
    int n = bpf_probe_read_kernel_str(&e->data[off & DATA_MASK], NAME_SLOT, name);
    if (n <= 0) {
        e->cut = 1;
        return 1;
    }
    e->data_len = off + n;
    e->walk_count++;
    w->dentry = parent;
    return 0;
}

/* Up to PATH_DEPTH steps of a walk (e->walk_count: how many components it wrote);
 * 0: it has more to go. */
static __always_inline long path_steps(struct event *e, struct path_walk *w)
{
    e->walk_count = 0;
    long end = 0;
    for (u32 i = 0; i < PATH_DEPTH; i++) {
        end = path_step(e, w);
        if (end)
            break;
    }
    return end;
}

static __always_inline void path_walk_init(struct path_walk *w, void *dentry, void *mnt)
{
    void *task = (void *)bpf_get_current_task();
    void *fs = read_ptr(task, OFF_TASK_FS);
    w->dentry = dentry;
    w->mnt = mnt;
    if (fs) {
        w->root_dentry = read_ptr(fs, OFF_FS_ROOT + OFF_PATH_DENTRY);
        w->root_mnt = read_ptr(fs, OFF_FS_ROOT + OFF_PATH_MNT);
    }
}

/* Append the components of (mnt, dentry)'s path, leaf first; returns their count. */
static __always_inline u16 put_path(struct event *e, void *dentry, void *mnt)
{
    struct path_walk w = {};
    path_walk_init(&w, dentry, mnt);
    long end = path_steps(e, &w);
    if (!end)
        e->cut = 1;             /* deeper than PATH_DEPTH: the root side is missing */
    return e->walk_count;
}

/* The record's last path goes on in deep_path (which sends the record); returns only
 * when no tail call is left: the rest of the path is missing. */
static __always_inline void path_goes_on(void *ctx, struct event *e)
{
    deep_tail.call(ctx, DEEP_PATH);
    e->cut = 1;
}

/* Append (mnt, dentry)'s path as the record's first and last path (an opened or
 * executed file): one deeper than PATH_DEPTH components goes on in deep_path, which
 * sends the record.  Returns only when it is complete or cannot go on. */
static __always_inline void put_last_path(void *ctx, struct event *e, void *dentry,
                                          void *mnt)
{
    struct deep_state *s = deep_state();
    if (!s)
        return;
    path_walk_init(&s->pw, dentry, mnt);
    long end = path_steps(e, &s->pw);
    e->n_base1 = e->walk_count;
    if (!end)
        path_goes_on(ctx, e);
}

/* The file behind fd in the current task, or NULL. */
static __always_inline void *fd_file(u64 fd)
{
    void *task = (void *)bpf_get_current_task();
    void *files = read_ptr(task, OFF_TASK_FILES);
    if (!files)
        return NULL;
    void *fdt = read_ptr(files, OFF_FILES_FDT);
    if (!fdt)
        return NULL;
    u32 max = read_u32(fdt, OFF_FDTABLE_MAX_FDS);
    if (fd >= max)
        return NULL;
    void **fds = read_ptr(fdt, OFF_FDTABLE_FD);
    if (!fds)
        return NULL;
    return read_ptr(fds, fd * sizeof(void *));
}

/* The base directory a path argument is relative to: dirfd or the cwd; 0 if none. */
static __always_inline int base_dir(s64 dfd, void **dentry, void **mnt)
{
    if (dfd == AT_FDCWD_VALUE || dfd < 0) {
        void *task = (void *)bpf_get_current_task();
        void *fs = read_ptr(task, OFF_TASK_FS);
        if (!fs)
            return 0;
        *dentry = read_ptr(fs, OFF_FS_PWD + OFF_PATH_DENTRY);
        *mnt = read_ptr(fs, OFF_FS_PWD + OFF_PATH_MNT);
    } else {
        void *file = fd_file(dfd);
        if (!file)
            return 0;
        *dentry = read_ptr(file, OFF_FILE_F_PATH + OFF_PATH_DENTRY);
        *mnt = read_ptr(file, OFF_FILE_F_PATH + OFF_PATH_MNT);
    }
    return *dentry != NULL;
}

/* Append the base directory a path argument is relative to: dirfd or the cwd. */
static __always_inline u16 put_base(struct event *e, s64 dfd, u16 which)
{
    void *dentry = NULL, *mnt = NULL;
    if (!base_dir(dfd, &dentry, &mnt))
        return 0;
    e->base_dirs |= which;
    u32 zero = 0;
    struct sent_base *w = base_written.lookup(&zero);
    struct pending *t = thread_pending(0);
    if (!w || !t)
        return put_path(e, dentry, mnt);
    struct sent_base now = {};
    now.dentry = (u64)dentry;
    now.mnt = (u64)mnt;
    now.mnt_id = mount_id(mnt);
    void *inode = read_ptr(dentry, OFF_DENTRY_D_INODE);
    now.ino = read_u64(inode, OFF_INODE_I_INO);
    now.dev = read_u32(read_ptr(inode, OFF_INODE_I_SB), OFF_SB_S_DEV);
    now.kgen = gen(GEN_KERNEL);
    now.valid = 1;
    if (t->sent.valid && t->sent.dentry == now.dentry && t->sent.mnt == now.mnt &&
        t->sent.mnt_id == now.mnt_id && t->sent.ino == now.ino && t->sent.dev == now.dev &&
        t->sent.kgen == now.kgen)
        return BASE_AS_BEFORE;
    u8 was_cut = e->cut;
    u16 n = put_path(e, dentry, mnt);
    if (n && !e->cut && !was_cut)
        *w = now;
    return n;
}

/* Fill the process part of a record. */
static __always_inline struct event *new_event(u32 kind)
{
    u32 zero = 0;
    struct event *e = scratch.lookup(&zero);
    if (!e)
        return NULL;
    struct sent_base *w = base_written.lookup(&zero);
    if (w)
        w->valid = 0;
    void *task = (void *)bpf_get_current_task();
    u64 pid_tgid = bpf_get_current_pid_tgid();
    e->ktime = bpf_ktime_get_ns();
    e->kind = kind;
    e->tp_id = 0;
    e->ret = 0;
    e->flags = 0;
    e->dev = 0;
    e->ino = 0;
    e->parent_ino = 0;
    e->left_ino = 0;
    e->rules = 0;
    e->name_rules = 0;
    e->pid = pid_tgid >> 32;
    e->tid = (u32)pid_tgid;
    void *parent = read_ptr(task, OFF_TASK_REAL_PARENT);
    e->ppid = parent ? read_u32(parent, OFF_TASK_TGID) : 0;
    void *cred = read_ptr(task, OFF_TASK_CRED);
    e->uid = read_u32(cred, OFF_CRED_UID);
    e->euid = read_u32(cred, OFF_CRED_EUID);
    e->gid = read_u32(cred, OFF_CRED_GID);
    e->loginuid = read_u32(task, OFF_TASK_LOGINUID);
    e->mntns = task_mntns(task);
    e->nspid = task_nspid(task);
    e->ouid = e->ogid = NO_ID;
    e->n_base1 = e->n_base2 = e->n_exe = e->has_name1 = e->has_name2 = e->cut = 0;
    e->base_dirs = 0;
    e->data_len = 0;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    return e;
}

/* Append the executable's path, then send the record. */
static __always_inline void submit_now(void *ctx, struct event *e)
{
    void *task = (void *)bpf_get_current_task();
    void *mm = read_ptr(task, OFF_TASK_MM);
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct exe_seen now = {};
    if (mm) {
        void *exe = read_ptr(mm, OFF_MM_EXE_FILE);
        now.exe_file = (u64)exe;
        now.start_time = read_u64(read_ptr(task, OFF_TASK_GROUP_LEADER), OFF_TASK_START_TIME);
        /* records describing another process (a fork's child) always carry the path */
        struct exe_seen *seen = e->pid == tgid ? exe_sent.lookup(&tgid) : NULL;
        if (seen && seen->exe_file == now.exe_file && seen->start_time == now.start_time)
            e->n_exe = EXE_AS_BEFORE;
        else if (exe)
            e->n_exe = put_path(e, read_ptr(exe, OFF_FILE_F_PATH + OFF_PATH_DENTRY),
                                read_ptr(exe, OFF_FILE_F_PATH + OFF_PATH_MNT));
    }
    u32 off = e->data_len;
    if (off > DATA_SIZE)
        off = DATA_SIZE;
    u32 size = __builtin_offsetof(struct event, data) + (off & (DATA_SIZE * 2 - 1));
    if (size > sizeof(*e))
        size = sizeof(*e);
    u32 idx = CNT_UNSIGNALLED;
    u64 *unsignalled = counters.lookup(&idx);
    u64 wake = RB_NO_WAKEUP;
    if (unsignalled && ++*unsignalled >= WAKEUP_EVERY) {
        *unsignalled = 0;
        wake = RB_FORCE_WAKEUP;
    }
    if (events.ringbuf_output(e, size, wake) == 0) {
        count(CNT_SUBMITTED);
        if (e->n_exe && e->n_exe != EXE_AS_BEFORE && e->pid == tgid)
            exe_sent.update(&tgid, &now);
        u32 zero = 0;
        struct sent_base *w = base_written.lookup(&zero);
        struct pending *t = w && w->valid && !e->cut ? thread_pending(0) : NULL;
        if (t && w)
            t->sent = *w;
    } else {
        count(CNT_LOST);
    }
}

/* Send the record being built (scratch), in send_event: the program ends there.  A
 * failed tail call (the kernel's limit of them reached) loses the record, counted. */
static __always_inline void submit(void *ctx, struct event *e)
{
    send_tail.call(ctx, 0);
    count(CNT_LOST);
}

/* Identity of a file for the record. */
static __always_inline void set_inode(struct event *e, void *inode)
{
    if (!inode)
        return;
    struct inode_head h = {};
    inode_head(inode, &h);
    e->dev = read_u32(h.sb, OFF_SB_S_DEV);
    e->ino = h.ino;
    e->ouid = h.uid;
    e->ogid = h.gid;
}

/* The directories of a syscall's object (auditd's PARENT items), on its filesystem
 * (dev): parent_ino, the one its name is in at the syscall's end (a new entry's, a
 * rename's new one); left_ino, another directory the syscall changed that is neither
 * that one nor the object nor removed (an unlink's, a rename's old one).  Chosen
 * without branches. */
static __always_inline void set_parents(struct event *e, struct pending *pc, void *object)
{
    void *dentry = object ? inode_dentry(object) : NULL;
    void *pdir = dentry ? read_ptr(read_ptr(dentry, OFF_DENTRY_D_PARENT),
                                   OFF_DENTRY_D_INODE) : NULL;
    if (pdir && pdir != object)
        e->parent_ino = read_u64(pdir, OFF_INODE_I_INO);
    u64 other = 0, n = pc->ntouched;
    OPAQUE(n);
    for (int i = 0; i < MAX_TOUCHED; i++) {
        u64 t = pc->touched[i];
        u64 mode = read_u16((void *)t, OFF_INODE_I_MODE);
        u64 nlink = read_u32((void *)t, OFF_INODE_I_NLINK);
        OPAQUE(mode);
        OPAQUE(nlink);
        u64 take = IS_EQ(mode & S_IFMT_MASK, S_IFDIR_BITS) & (IS_ZERO(nlink) ^ 1) &
                   (is_zero64(t ^ (u64)object) ^ 1) & (is_zero64(t ^ (u64)pdir) ^ 1) &
                   (((u64)i - n) >> 63);
        OPAQUE(take);
        other = (other & (take - 1)) | (t & (0 - take));
    }
    if (other)
        e->left_ino = read_u64((void *)other, OFF_INODE_I_INO);
}

/* ---- the syscall in progress: known from the thread's registers ------------------
 * No program runs at a syscall's entry.  The first inode a followed syscall changes
 * (on_ctime) starts its entry in pending, from the syscall number in the thread's
 * saved registers; sys_exit reads the arguments from the same registers (the kernel
 * does not change them during a file syscall) and takes a syscall that changed
 * nothing from there alone.  Unfollowed syscalls (read, write, close...) run no
 * program at their entry, and a followed one that changes no inode none before its
 * end. */

/* The syscall_spec slot of syscall nr in the current task: the 64-bit table, or for a
 * 32-bit syscall (ia32 emulation, its own numbering) the 32-bit table from COMPAT_BASE
 * on; -1 when the syscall is not followed. */
static __always_inline s32 spec_slot(u32 nr, int *compat)
{
    *compat = 0;
    if (nr >= COMPAT_BASE)
        return -1;
    struct syscall_spec *native = syscall_spec.lookup(&nr);
    int native_on = native && native->active;
#ifdef OFF_TASK_TI_STATUS
    u32 cnr = nr + COMPAT_BASE;
    struct syscall_spec *c = syscall_spec.lookup(&cnr);
    int compat_on = c && c->active;
    if (!native_on && !compat_on)
        return -1;
    if (read_u32((void *)bpf_get_current_task(), OFF_TASK_TI_STATUS) & TS_COMPAT_BIT) {
        *compat = 1;
        return compat_on ? (s32)cnr : -1;
    }
#endif
    return native_on ? (s32)nr : -1;
}

#define PF_KTHREAD_FLAG   0x00200000    /* task_struct.flags: a kernel thread */
#define PF_IO_WORKER_FLAG 0x00000010    /* task_struct.flags: an io-wq worker */

/* The user registers the current thread entered the kernel with, or NULL for a kernel
 * thread or an io-wq worker (they make no syscalls). */
static __always_inline void *user_regs(void)
{
    void *task = (void *)bpf_get_current_task();
    if (read_u32(task, OFF_TASK_FLAGS) & (PF_KTHREAD_FLAG | PF_IO_WORKER_FLAG))
        return NULL;
    return (void *)bpf_task_pt_regs(bpf_get_current_task_btf());
}

/* The syscall_spec slot of the followed syscall the current thread is in, or -1. */
static __always_inline s32 current_slot(void *regs)
{
    int compat;
    return regs ? spec_slot(read_u64(regs, OFF_REGS_SYSCALL_NR), &compat) : -1;
}

/* A syscall's arguments, from its registers (32-bit ones from others). */
static __always_inline void syscall_args(void *regs, int compat, u64 *args)
{
#ifdef OFF_TASK_TI_STATUS
    if (compat) {
        args[0] = (u32)read_u64(regs, OFF_CREGS_ARG0);
        args[1] = (u32)read_u64(regs, OFF_CREGS_ARG1);
        args[2] = (u32)read_u64(regs, OFF_CREGS_ARG2);
        args[3] = (u32)read_u64(regs, OFF_CREGS_ARG3);
        args[4] = (u32)read_u64(regs, OFF_CREGS_ARG4);
        args[5] = (u32)read_u64(regs, OFF_CREGS_ARG5);
        return;
    }
#endif
    args[0] = read_u64(regs, OFF_REGS_ARG0);
    args[1] = read_u64(regs, OFF_REGS_ARG1);
    args[2] = read_u64(regs, OFF_REGS_ARG2);
    args[3] = read_u64(regs, OFF_REGS_ARG3);
    args[4] = read_u64(regs, OFF_REGS_ARG4);
    args[5] = read_u64(regs, OFF_REGS_ARG5);
}

/* Start the state of followed syscall slot: nothing changed yet, its scope judged. */
static __always_inline void begin_syscall(struct pending *p, s32 slot)
{
    p->tp_id = slot;
    p->ntouched = 0;
    p->overflow = 0;
    p->judged = 0;
    p->granted = 0;
    p->renames = 0;
    struct syscall_spec *sp = syscall_spec.lookup(&p->tp_id);
    if (sp && sp->moves && sp->path2 >= 0)
        p->renames = 1;
    p->perms = 0;
    p->rules = 0;
    p->names = 0;
    p->dir = 0;
    u32 zero = 0;
    struct config *cfg = config.lookup(&zero);
    int all_paths = 0;
    p->scope = SCOPE_OUT;
    if (cfg && in_scope(cfg, bpf_get_current_pid_tgid() >> 32, &all_paths))
        p->scope = all_paths ? SCOPE_ALL_PATHS : SCOPE_IN;
}

/* The current thread's entry for the followed syscall it is in, started if this is the
 * syscall's first change; NULL outside one. */
static __always_inline struct pending *syscall_in_progress(void)
{
    struct pending *p = thread_pending(0);
    if (p && p->active)
        return p;
    s32 slot = current_slot(user_regs());
    if (slot < 0)
        return NULL;
    if (!p)
        p = thread_pending(1);
    if (!p) {
        count(CNT_PENDING_FULL);
        return NULL;
    }
    begin_syscall(p, slot);
    p->active = 1;
    return p;
}

/* ---- timestamp:* : an inode's ctime moved (every metadata change) ----------------- */
/* Judge an inode a followed syscall changes, by every name it has now (a removed
 * object still has its name here; at the syscall's end it has none).  A new inode has
 * no name yet: it is judged at the syscall's end. */
static __always_inline void judge_changed(struct pending *p, void *inode, u32 n)
{
    u32 zero = 0;
    struct config *cfg = config.lookup(&zero);
    if (!cfg || !cfg->have_watches || p->scope == SCOPE_OUT)
        return;
    void *dentry = inode_dentry(inode);
    if (!dentry)
        return;
    struct match m = {};
    u8 below = 0xff;
    u64 g = object_perms(inode, dentry, &m, 1, &below);
    if (is_dir(inode)) {
        /* the directory whose entries a syscall's other changes most likely are: what
         * it grants them settles those at the syscall's end (changed_settled) */
        p->dir = p->dir ? DIRS_SEVERAL : (u64)inode;
        p->dir_below = below;
        p->dir_kgen = gen(GEN_KERNEL);
        p->dir_ugen = gen(GEN_USER);
    }
    p->perms |= g;
    p->rules |= m.rules;
    p->names |= m.names;
    OPAQUE(g);
    if (n < MAX_TOUCHED) {
        p->judged |= 1 << n;
        p->granted |= (IS_ZERO(g) ^ 1) << n;
    }
}

/* ---- io_uring: the request an io-wq worker runs ------------------------------------
 * Operations submitted through io_uring run in io-wq workers (threads of the
 * submitter, sharing its files and cwd) and pass no syscall tracepoint.  The worker's
 * current request (task->worker_private: struct io_worker, cur_work: the io_wq_work
 * inside struct io_kiocb) tells the exact opcode and, while it runs, the names it was
 * given (struct filename copies of the user's strings) and their dirfds. */

static __always_inline void *uring_worker_req(void)
{
    void *task = (void *)bpf_get_current_task();
    if (!(read_u32(task, OFF_TASK_FLAGS) & PF_IO_WORKER_FLAG))
        return NULL;
    void *worker = read_ptr(task, OFF_TASK_WORKER_PRIVATE);
    void *work = worker ? read_ptr(worker, OFF_IO_WORKER_CUR_WORK) : NULL;
    return work ? (char *)work - OFF_IO_KIOCB_WORK : NULL;
}

/* Append a kernel string (a struct filename's name) at the record's write position. */
static __always_inline void put_kernel_name(struct event *e, void *filename)
{
    u32 off = e->data_len;
    if (off >= DATA_SIZE) {
        e->cut = 1;
        return;
    }
    const void *name = filename ? read_ptr(filename, OFF_FILENAME_NAME) : NULL;
    int n = name ? bpf_probe_read_kernel_str(&e->data[off & DATA_MASK], PATH_SLOT, name) : 0;
    if (n <= 0) {
        e->data[off & DATA_MASK] = 0;
        n = 1;
    }
    e->data_len = off + n;
}

/* The names request req was given, as a syscall's arguments are recorded: base
 * directory and name, twice for rename and link.  0: not a request with names. */
static __always_inline int put_uring_names(struct event *e, void *req, u8 opcode)
{
    void *cmd = (char *)req + OFF_IO_KIOCB_CMD;
    s32 dfd1, dfd2 = 0;
    void *name1, *name2 = NULL;
    int two = 0;
    if (opcode == IORING_OP_RENAMEAT || opcode == IORING_OP_LINKAT ||
        opcode == IORING_OP_SYMLINKAT) {
        int ren = opcode == IORING_OP_RENAMEAT;   /* struct io_rename, else io_link */
        dfd1 = read_u32(cmd, ren ? OFF_IO_RENAME_OLD_DFD : OFF_IO_LINK_OLD_DFD);
        dfd2 = read_u32(cmd, ren ? OFF_IO_RENAME_NEW_DFD : OFF_IO_LINK_NEW_DFD);
        name1 = read_ptr(cmd, ren ? OFF_IO_RENAME_OLDPATH : OFF_IO_LINK_OLDPATH);
        name2 = read_ptr(cmd, ren ? OFF_IO_RENAME_NEWPATH : OFF_IO_LINK_NEWPATH);
        two = opcode != IORING_OP_SYMLINKAT;
        if (!two) {             /* symlinkat: oldpath is the link's text */
            dfd1 = dfd2;
            name1 = name2;
        }
    } else if (opcode == IORING_OP_OPENAT || opcode == IORING_OP_OPENAT2) {
        dfd1 = read_u32(cmd, OFF_IO_OPEN_DFD);
        name1 = read_ptr(cmd, OFF_IO_OPEN_FILENAME);
    } else if (opcode == IORING_OP_UNLINKAT || opcode == IORING_OP_MKDIRAT) {
        int un = opcode == IORING_OP_UNLINKAT;    /* struct io_unlink, else io_mkdir */
        dfd1 = read_u32(cmd, un ? OFF_IO_UNLINK_DFD : OFF_IO_MKDIR_DFD);
        name1 = read_ptr(cmd, un ? OFF_IO_UNLINK_FILENAME : OFF_IO_MKDIR_FILENAME);
        if (opcode == IORING_OP_UNLINKAT)
            e->flags |= (u64)read_u32(cmd, OFF_IO_UNLINK_FLAGS) << URING_FLAGS_SHIFT;
    } else {
        return 0;
    }
    e->flags |= URING_NAMED;
    e->n_base1 = put_base(e, dfd1, 1);
    put_kernel_name(e, name1);
    e->has_name1 = 1;
    if (two) {
        e->n_base2 = put_base(e, dfd2, 2);
        put_kernel_name(e, name2);
        e->has_name2 = 1;
    }
    return 1;
}

/* Which name an inode's first dentry has: its name's hash and length (the first 8
 * bytes of struct qstr) and its parent.  A rename's filesystem changes come before the
 * dentry is moved (d_move), so the moved object is the changed inode whose name_id
 * differs at the syscall's end. */
static __always_inline u64 name_id(void *inode)
{
    void *dentry = inode_dentry(inode);
    if (!dentry)
        return 0;
    return read_u64(dentry, OFF_DENTRY_D_NAME) ^ (u64)read_ptr(dentry, OFF_DENTRY_D_PARENT);
}

static __always_inline int on_ctime(struct bpf_raw_tracepoint_args *ctx)
{
    void *inode = (void *)ctx->args[0];
    struct pending *p = syscall_in_progress();
    if (p) {
        u32 n = p->ntouched;
        for (int i = 0; i < MAX_TOUCHED; i++)
            if (i < n && p->touched[i] == (u64)inode)
                return 0;       /* rename within a directory touches it twice */
        if (n < MAX_TOUCHED) {
            p->touched[n & (MAX_TOUCHED - 1)] = (u64)inode;
            if (p->renames)
                p->touched_name[n & (MAX_TOUCHED - 1)] = name_id(inode);
            p->ntouched = n + 1;
        } else {
            p->overflow = 1;
        }
        judge_changed(p, inode, n);
        deep_defer(ctx, DEEP_CTIME);    /* its walk ended short: continued */
        return 0;
    }
    /* a directory changed outside a followed syscall (io_uring rename or unlink...) */
    if (is_dir(inode))
        bump_kernel_gen();
    /* No syscall in progress: an io_uring worker acting for a process (a change by an
     * unfollowed syscall, such as write, or by another kernel path is not reported).
     * It is judged in uring_ctime, one program shared by the three tracepoints (the
     * verifier checks it once). */
    if (uring_worker_req())
        ctime_tail.call(ctx, 0);
    return 0;
}

/* A change an io-wq worker made: judged here, there will be no syscall exit.  Reached
 * by a tail call from the ctime tracepoints (the loader puts it in ctime_tail). */
int uring_ctime(struct bpf_raw_tracepoint_args *ctx)
{
    void *inode = (void *)ctx->args[0];
    u32 tid = (u32)bpf_get_current_pid_tgid();
    void *req = uring_worker_req();
    if (!req)
        return 0;
    u32 tgid;
    int all_paths;
    struct config *cfg = current_scope(&tgid, &all_paths);
    if (!cfg)
        return 0;
    u8 opcode = read_u8(req, OFF_IO_KIOCB_OPCODE);
    if (opcode == IORING_OP_OPENAT || opcode == IORING_OP_OPENAT2) {
        u8 one = 1;             /* it created its file: its completion is not an open */
        u64 key = (u64)req;
        uring_created.update(&key, &one);
    }
    void *dentry = inode_dentry(inode);
    if (!dentry) {
        u64 ptr = (u64)inode;
        uring_new.update(&tid, &ptr);
        return 0;
    }
    struct match m = {};
    u8 perms = inode_perms(inode, &m);
    deep_count();
    if (!(perms & (PERM_W | PERM_A)) && !all_paths)
        return 0;
    struct event *e = new_event(EV_URING);
    if (!e)
        return 0;
    e->tp_id = opcode;
    e->rules = m.rules;
    e->name_rules = m.names;
    u64 *fresh = uring_new.lookup(&tid);
    if (fresh) {
        set_inode(e, (void *)*fresh);
        e->flags = URING_NEW_ENTRY;
        uring_new.delete(&tid);
    } else {
        set_inode(e, inode);
    }
    if (!put_uring_names(e, req, opcode))
        e->n_base1 = put_path(e, dentry, NULL);
    submit(ctx, e);
    return 0;
}

/* The end of every record of a raw tracepoint program (submit; build.py TAIL_CALLS). */
int send_event(struct bpf_raw_tracepoint_args *ctx)
{
    u32 zero = 0;
    struct event *e = scratch.lookup(&zero);
    if (e)
        submit_now(ctx, e);
    return 0;
}

RAW_TRACEPOINT_PROBE(inode_set_ctime_to_ts) { return on_ctime(ctx); }
RAW_TRACEPOINT_PROBE(ctime_ns_xchg) { return on_ctime(ctx); }
RAW_TRACEPOINT_PROBE(ctime_xchg_skip) { return on_ctime(ctx); }

/* ---- path-less rules: syscall rules on every object ------------------------------- */
/* A path-less rule (-S unlink -F auid>=1000, no path) has its rule slot bit in the
 * syscall_spec.pathless mask of each syscall it names; its conditions on what the kernel
 * knows here (ids, pid, success, exit; KERNEL_FIELDS in abi.py) are in rule_filters, at
 * most MAX_KCONDS per rule, so a syscall they reject never reaches the ring.  The rest
 * (exe, comm...) user space evaluates.  Path-less rules get the first rule slots; the
 * first PATHLESS_SLOTS of them are filtered here.  One map lookup for all rules, one
 * read of the credentials, and branch-free comparisons for only the slots the syscall
 * is marked with keep both the run time and the verifier's work small. */
struct slot_filter {
    struct kcond c[MAX_KCONDS];     /* unused: REL_ANY */
};
struct rule_filter_table {
    u64 needs;                      /* bit KF_*: a condition compares it */
    struct slot_filter slot[PATHLESS_SLOTS];
};
BPF_ARRAY(rule_filters, struct rule_filter_table, 1);

/* what the conditions compare, per CPU (indexed by KF_*) */
struct kvalues {
    s64 v[KVALS];
};
BPF_PERCPU_ARRAY(kvals, struct kvalues, 1);

/* The path-less rules (slot bits) whose kernel conditions the ending syscall meets. */
static __always_inline u64 pathless_rules(struct syscall_spec *spec, s64 ret)
{
    u64 mask = spec->pathless;
    if (!mask)
        return 0;
    u32 zero = 0;
    struct rule_filter_table *f = rule_filters.lookup(&zero);
    struct kvalues *kv = kvals.lookup(&zero);
    if (!f || !kv)
        return 0;
    void *task = (void *)bpf_get_current_task();
    void *cred = read_ptr(task, OFF_TASK_CRED);
    kv->v[KF_NONE] = 0;
    kv->v[KF_LOGINUID] = read_u32(task, OFF_TASK_LOGINUID);
    kv->v[KF_UID] = read_u32(cred, OFF_CRED_UID);
    kv->v[KF_EUID] = read_u32(cred, OFF_CRED_EUID);
    kv->v[KF_SUID] = read_u32(cred, OFF_CRED_SUID);
    kv->v[KF_FSUID] = read_u32(cred, OFF_CRED_FSUID);
    kv->v[KF_GID] = read_u32(cred, OFF_CRED_GID);
    kv->v[KF_EGID] = read_u32(cred, OFF_CRED_EGID);
    kv->v[KF_SGID] = read_u32(cred, OFF_CRED_SGID);
    kv->v[KF_FSGID] = read_u32(cred, OFF_CRED_FSGID);
    kv->v[KF_PID] = bpf_get_current_pid_tgid() >> 32;
    kv->v[KF_PPID] = 0;
    if (f->needs & (1 << KF_PPID)) {
        void *parent = read_ptr(task, OFF_TASK_REAL_PARENT);
        kv->v[KF_PPID] = parent ? read_u32(parent, OFF_TASK_TGID) : 0;
    }
    kv->v[KF_SUCCESS] = ret >= 0;
    kv->v[KF_EXIT] = ret;
    /* slots from PATHLESS_SLOTS on pass unfiltered (user space evaluates them) */
    u64 out = mask & ~((1ULL << PATHLESS_SLOTS) - 1);
    for (u32 i = 0; i < PATHLESS_SLOTS; i++) {
        u64 rest = mask >> i;
        if (!rest)
            break;
        if (!(rest & 1))
            continue;
        u64 ok = 1;
        for (u32 j = 0; j < MAX_KCONDS; j++) {
            struct kcond *k = &f->slot[i].c[j];
            /* the outcome as a REL_* bit, without branches: values are ids and
             * return values, so the difference cannot overflow.  The other side is
             * value plus another field (-C uid!=euid) or plus KF_NONE's 0. */
            u64 d = kv->v[k->field & (KVALS - 1)] -
                    (k->value + kv->v[k->other & (KVALS - 1)]);
            u64 lt = d >> 63;
            u64 eq = ((d | -d) >> 63) ^ 1;
            u64 rel = lt | (eq << 1) | ((1 - lt - eq) << 2);
            ok &= ((k->rel & rel) + 0xff) >> 8;
        }
        out |= ok << i;
    }
    return out;
}

/* ---- syscall exit: decide and report ---------------------------------------------- */
static __always_inline u8 open_perm(u64 flags, u8 created)
{
    u8 acc = flags & OFLAG_ACCMODE;
    if (created)
        return PERM_W;
    if (acc == OFLAG_WRONLY)
        return PERM_W;
    if (acc == OFLAG_RDWR)
        return PERM_R | PERM_W;
    return PERM_R;
}

/* The followed syscall ending in this thread: its spec, and in ending its state (a
 * copy of the thread's entry when it changed something, else a fresh one) with its
 * arguments. */
static __always_inline struct syscall_spec *ending_syscall(struct bpf_raw_tracepoint_args *ctx,
                                                           struct pending **out)
{
    void *regs = (void *)ctx->args[0];
    int compat;
    s32 slot = spec_slot(read_u64(regs, OFF_REGS_SYSCALL_NR), &compat);
    if (slot < 0) {
        if (compat && !HAVE_COMPAT_TABLE)
            count(CNT_COMPAT);
        return NULL;
    }
    u32 nr = slot;
    struct syscall_spec *spec = syscall_spec.lookup(&nr);
    u32 zero = 0;
    struct pending *pc = ending.lookup(&zero);
    if (!spec || !spec->active || !pc)
        return NULL;
    struct pending *p = thread_pending(0);
    if (p && p->active && p->tp_id == nr) {
        p->active = 0;
        __builtin_memcpy(pc, p, PENDING_COPY);
    } else {
        if (p)
            p->active = 0;
        begin_syscall(pc, slot);
    }
    syscall_args(regs, compat, pc->args);
    *out = pc;
    return spec;
}

/* The flags the syscall was called with (or those it implies). */
static __always_inline u64 syscall_flags(struct syscall_spec *spec, struct pending *pc)
{
    u64 flags = spec->fixed_flags;
    if (spec->flags >= 0) {
        if (spec->flags_in_struct)
            bpf_probe_read_user(&flags, sizeof(flags), (void *)pc->args[spec->flags & 7]);
        else
            flags = pc->args[spec->flags & 7];
    }
    return flags;
}

/* A record of the syscall, without paths yet. */
static __always_inline struct event *syscall_event(u32 kind, struct pending *pc, s64 ret,
                                                   u64 flags)
{
    struct event *e = new_event(kind);
    if (!e)
        return NULL;
    e->tp_id = pc->tp_id;
    e->ret = ret;
    e->flags = flags;
    return e;
}

/* What sys_exit worked out, for the program it goes on in (exit_tail). */
struct exit_state {
    s64 ret;
    u64 flags;
    u64 pathless;
    u64 any_object;
    u32 all_paths;
    u32 scan_k;                 /* exit_scan: the path argument it scans */
    u64 upath[2];               /* the path arguments */
    u8 names[2];                /* what each one's name says (NAME_*): NAME_SCAN until
                                 * exit_scan has scanned it */
    u8 pad[6];
};
BPF_PERCPU_ARRAY(exit_states, struct exit_state, 1);

/* ---- failed syscalls: which may concern a watched object --------------------------
 * A failed syscall changed no inode, so there is no inode verdict: user space matches
 * its names against the rules.  Sending every failure would flood the ring with the
 * unwatched ENOENT opens of every program (ld.so, include searches), so each path
 * argument is judged here first, cheaply and on the safe side (send when unsure):
 *   absolute path   a prefix of it (at a '/' or its end) is a watched object's path
 *                   (watched_prefix, FNV-1a hashes from user space, with the names
 *                   root-level symlinks give them: /bin -> usr/bin);
 *   relative path   its base directory (dirfd or cwd) grants the operation to its
 *                   entries (and so further below), or lies above a watched object
 *                   (watch_ancestor);
 *   either          "." and ".." are resolved by name (as user space joins names); a
 *                   relative path climbing above its base, or longer than FAIL_SCAN:
 *                   sent;
 *   fd argument     the fd's file exists (fchmod and friends: EBADF is no object).
 * Not caught: a name reaching a watched object through a symlink other than the
 * root-level ones, or through a bind mount or mount point placed outside the watched
 * tree (the name is then not under the watched path for user space either). */
static __always_inline int hash_watched(u64 h)
{
    return watched_prefix.lookup(&h) != NULL;
}


/* Scan a path argument (NUL-terminated in b): 1 to send it.  The path is resolved
 * lexically, as user space joins names ("." and empty components dropped, ".." takes
 * the last component off; b->hs[d] is the hash of the first d components), and the
 * hash of every prefix is looked up as its component ends.  A relative path's hashes
 * start from another seed (they never match a watched, absolute, path); one that
 * climbs above its base directory, or is deeper than HASH_DEPTH - 2 or longer than
 * FAIL_SCAN, is sent (unsure).  Flags are computed without branches: the verifier
 * then sees about one state per byte. */
static __always_inline int scan_failed_path(struct fail_buf *b)
{
    u64 rel = b->s[0] != '/';
    u64 cur = FNV_OFFSET ^ rel;
    if (!rel && hash_watched(cur))
        return 1;               /* "/" itself is watched */
    b->hs[0] = cur;
    cur = (cur ^ '/') * FNV_PRIME;
    u64 d = 0, comp = 0, dots = 0, unsure = 0;
    for (u32 i = 0; i < FAIL_SCAN; i++) {
        u64 c = (u8)b->s[i];
        OPAQUE(c);
        u64 sep = IS_EQ(c, '/') | IS_ZERO(c);
        u64 dot1 = IS_EQ(comp, 1) & IS_EQ(dots, 1);
        u64 dot2 = IS_EQ(comp, 2) & IS_EQ(dots, 2);
        u64 named = sep & (IS_ZERO(comp) ^ 1) & (dot1 ^ 1) & (dot2 ^ 1);
        u64 up = sep & dot2;
        unsure |= (up & IS_ZERO(d) & rel) | IS_EQ(d, HASH_DEPTH - 2);
        b->hs[(d + 1) & (HASH_DEPTH - 1)] = cur;  /* kept if a component ended here */
        d = d + named - (up & (IS_ZERO(d) ^ 1));
        u64 ended = cur;
        u64 mask = 0 - sep;
        cur = (((b->hs[d & (HASH_DEPTH - 1)] ^ '/') * FNV_PRIME) & mask) |
              (((cur ^ c) * FNV_PRIME) & ~mask);
        comp = (comp + 1) * (1 - sep);
        dots = (dots + IS_EQ(c, '.')) * (1 - sep);
        /* the branches last, on copies: what they teach the verifier about a value
         * must not split the states of the next byte */
        OPAQUE(named);
        if (named && hash_watched(ended))
            return 1;
        if (IS_ZERO(c))
            return unsure != 0;
    }
    return 1;                   /* longer than FAIL_SCAN: unsure */
}

/* What the name of path argument k (0: the first, 1: the second) of a failed syscall
 * says by itself.  sys_exit tells which are to be scanned (NAME_SCAN), exit_scan scans
 * them, in a program of its own: the verifier meets the byte loop once, with little
 * else live. */
#define NAME_NONE  0            /* no name: no such argument, or an unreadable one */
#define NAME_SEND  1            /* it may name a watched object, or it is unsure */
#define NAME_CLEAR 2            /* an absolute name that names no watched object */
#define NAME_REL   3            /* a relative name: its base directory decides */
#define NAME_NULL  4            /* NULL: the dirfd's own file (utimensat(fd, NULL)) */
#define NAME_SCAN  5            /* to be scanned */
static __always_inline u8 name_arg(struct syscall_spec *spec, struct pending *pc, u32 k,
                                   u64 *upath)
{
    s16 pidx = k ? spec->path2 : spec->path1;
    if (pidx < 0 || (k == 0 && spec->fd >= 0))
        return NAME_NONE;
    *upath = pc->args[pidx & 7];
    return *upath ? NAME_SCAN : NAME_NULL;
}

/* Path argument k of a failed syscall, its name scanned (NAME_*): ARG_SEND if it may
 * name a watched object, ARG_NONE if it cannot, ARG_BASE if its base directory decides
 * (a relative name; *base is set). */
#define ARG_NONE 0
#define ARG_SEND 1
#define ARG_BASE 2
static __always_inline int failed_arg(struct syscall_spec *spec, struct pending *pc, u32 k,
                                      u8 name, void **base)
{
    s16 didx = k ? spec->dfd2 : spec->dfd1;
    void *mnt = NULL;
    if (k == 0 && spec->fd >= 0)        /* fchmod and friends: EBADF is no object */
        return fd_file(pc->args[spec->fd & 7]) ? ARG_SEND : ARG_NONE;
    if (name == NAME_NONE || name == NAME_CLEAR)
        return ARG_NONE;
    if (name == NAME_SEND)
        return ARG_SEND;
    s64 dfd = didx >= 0 ? (s64)(s32)pc->args[didx & 7] : AT_FDCWD_VALUE;
    if (name == NAME_NULL)
        return dfd >= 0 ? ARG_SEND : ARG_NONE;
    if (!base_dir(dfd, base, &mnt))
        return ARG_SEND;
    return ARG_BASE;
}

/* A failed syscall that may concern a watched object, for every errno (Linux audit
 * reports failures on watched objects whatever the reason): names decide in user
 * space.  One base directory is judged (two different ones: sent, unsure). */
static __always_inline struct event *failed_event(struct config *cfg,
                                                  struct exit_state *x,
                                                  struct syscall_spec *spec,
                                                  struct pending *pc)
{
    s64 ret = x->ret;
    u64 flags = x->flags;
    if (x->all_paths)
        return syscall_event(EV_FAILED, pc, ret, flags);
    if (!cfg->have_watches)
        return NULL;
    void *judged = NULL;
    int send = 0;
#pragma nounroll
    for (u32 k = 0; k < 2; k++) {
        void *base = NULL;
        int r = failed_arg(spec, pc, k, x->names[k & 1], &base);   /* exit_scan's */
        if (r == ARG_SEND || (r == ARG_BASE && judged && judged != base)) {
            send = 1;
            break;
        }
        if (r == ARG_BASE)
            judged = base;
    }
    if (!send && judged) {
        void *inode = read_ptr(judged, OFF_DENTRY_D_INODE);
        struct watch_key key = {};
        if (inode)
            inode_key(inode, &key);
        if (!inode || watch_ancestor.lookup(&key)) {
            send = 1;
        } else {
            u8 need = spec->kind == KIND_OPEN
                      ? open_perm(flags, (flags & OFLAG_CREAT) != 0) : spec->perm;
            struct dir_verdict v = {};
            verdict_of(judged, inode, &v);
            /* a walk that ended short: unsure, sent (user space judges the names);
             * the note is taken in any case */
            int unsure = deep_taken();
            send = (v.below & need) != 0 || unsure;
        }
    }
    if (!send)
        return NULL;
    return syscall_event(EV_FAILED, pc, ret, flags);
}

/* A successful open: the opened file decides, and the record names it. */
static __always_inline void report_open(void *ctx, struct pending *pc, s64 ret, u64 flags,
                                        u64 any_object, u64 pathless)
{
    void *file = fd_file(ret);
    if (!file)
        return;
    void *dentry = read_ptr(file, OFF_FILE_F_PATH + OFF_PATH_DENTRY);
    void *mnt = read_ptr(file, OFF_FILE_F_PATH + OFF_PATH_MNT);
    /* created: the open changed the directory the file is in (an overlay copy-up
     * changes the upper directory, not this one) */
    u8 created = 0;
    if (flags & OFLAG_CREAT) {
        void *dir = read_ptr(read_ptr(dentry, OFF_DENTRY_D_PARENT), OFF_DENTRY_D_INODE);
        for (int i = 0; i < MAX_TOUCHED; i++)
            if (i < pc->ntouched && pc->touched[i] == (u64)dir)
                created = 1;
    }
    u8 need = open_perm(flags, created);
    struct match m = {};
    u8 perms = watched_perms(dentry, mnt, &m);
    struct deep_state *s = deep_state();
    if (s) {
        /* if its walk ended short: continued, then deep_open judges the open again */
        s->ret = ret;
        s->flags = flags;
        s->any_object = any_object;
        s->pathless = pathless;
        deep_defer(ctx, DEEP_OPEN);
    }
    if (!(perms & need) && !any_object)
        return;
    struct event *e = syscall_event(EV_SYSCALL, pc, ret,
                                    flags | ((u64)created << CREATED_FLAG_SHIFT));
    if (!e)
        return;
    e->rules = m.rules | pathless;
    e->name_rules = m.names;
    set_inode(e, read_ptr(file, OFF_FILE_F_INODE));
    void *pdir = read_ptr(read_ptr(dentry, OFF_DENTRY_D_PARENT), OFF_DENTRY_D_INODE);
    e->parent_ino = pdir ? read_u64(pdir, OFF_INODE_I_INO) : 0;
    put_last_path(ctx, e, dentry, mnt);
    submit(ctx, e);
}

/* A file's own watch ends with its last link: its inode number may be reused at once
 * by a new file (user space marks the file a rule names again when one appears). */
static __always_inline void forget_if_gone(void *inode)
{
    u32 zero = 0;
    struct config *cfg = config.lookup(&zero);
    if (!cfg || !cfg->file_watches || is_dir(inode) || read_u32(inode, OFF_INODE_I_NLINK))
        return;
    struct watch_key key = {};
    inode_key(inode, &key);
    watched.delete(&key);
}

/* The object a syscall changed, among the inodes it changed and those the watches
 * grant something to (a chmod through /proc/self/fd/N also changes a proc inode): the
 * one a rename moved
 * (its name differs from the one it had when it changed: the filesystem's changes
 * come before d_move), else one an unlink or rmdir removed (no name left), else the
 * first non-directory (an unlink of one of several links, a link), else the first.
 * Chosen without branches: the rest of the program is verified once, not once per
 * combination of candidates. */
static __always_inline void *object_of(struct syscall_spec *spec, struct pending *pc)
{
    u64 two = spec->path2, moves = spec->moves, n = pc->ntouched;
    OPAQUE(two);
    OPAQUE(moves);
    OPAQUE(n);
    two = ((two & 0xFFFF) >> 15) ^ 1;           /* s16 path2 >= 0: rename, link */
    moves = IS_ZERO(moves) ^ 1;
    u64 best = 0, sel = 0;
    for (int i = 0; i < MAX_TOUCHED; i++) {
        if ((u64)i >= n)
            break;              /* the end: the choice so far stands */
        u64 inode = pc->touched[i];
        u64 alias = (u64)read_ptr((void *)inode, OFF_INODE_I_DENTRY);
        void *dentry = (char *)alias - OFF_DENTRY_D_ALIAS;
        u64 mode = read_u16((void *)inode, OFF_INODE_I_MODE);
        u64 nlink = read_u32((void *)inode, OFF_INODE_I_NLINK);
        u64 nid = 0;
        if (pc->renames)        /* the same for every inode: no new verifier state */
            nid = read_u64(dentry, OFF_DENTRY_D_NAME) ^
                  (u64)read_ptr(dentry, OFF_DENTRY_D_PARENT);
        OPAQUE(alias);
        OPAQUE(mode);
        OPAQUE(nid);
        OPAQUE(nlink);
        u64 named = is_zero64(alias) ^ 1;
        u64 live = IS_ZERO(nlink) ^ 1;      /* not a target a rename replaced */
        u64 dir = IS_EQ(mode & S_IFMT_MASK, S_IFDIR_BITS);
        u64 moved = named & live & moves & two & (is_zero64(nid ^ pc->touched_name[i]) ^ 1);
        u64 removed = (named ^ 1) & (two ^ 1);
        u64 file = named & (dir ^ 1);
        u64 granted = (pc->granted >> i) & 1;
        u64 score = 1 + 2 * file + 4 * removed + 8 * moved + 16 * granted;
        OPAQUE(score);
        u64 take = (best - score) >> 63;        /* score > best */
        u64 mask = 0 - take;
        sel = (sel & ~mask) | (inode & mask);
        best = (best & ~mask) | (score & mask);
    }
    return (void *)sel;
}

/* Another successful syscall: the inodes it changed decide.  *first is the first of
 * them (the record's inode when its arguments name none). */
static __always_inline struct event *changed_event(struct syscall_spec *spec,
                                                   struct pending *pc, s64 ret, u64 flags,
                                                   int all_paths, u64 any_object,
                                                   u64 pathless, void **first)
{
    /* judged when they changed; new inodes (named since) now; and for a rename or a
     * link, what its old names did not grant, by the names it has now (a file moved or
     * linked into a watched name from outside: `mv x /etc/ld.so.preload`) */
    u8 perms = pc->perms;
    struct match m = {};
    m.rules = pc->rules;
    m.names = pc->names;
    u64 two = spec->path2;
    OPAQUE(two);
    two = ((two & 0xFFFF) >> 15) ^ 1;           /* s16 path2 >= 0: rename, link */
    u32 judge_now = ~pc->judged | (~pc->granted & (u32)(0 - two));
    for (int i = 0; i < MAX_TOUCHED; i++) {
        if (i < pc->ntouched) {
            void *inode = (void *)pc->touched[i];
            void *dentry = inode_dentry(inode);
            if (!*first)
                *first = inode;
            if (judge_now & (1 << i)) {
                u64 g = object_perms(inode, dentry, &m, 0, NULL);
                perms |= g;
                OPAQUE(g);
                pc->granted |= (IS_ZERO(g) ^ 1) << i;
            }
            forget_if_gone(inode);
        }
    }
    deep_count();       /* new inodes: their directory's walk was continued at its change */
    if (!any_object && !(perms & spec->perm))
        return NULL;
    if (all_paths && !*first)
        return NULL;
    if (pc->ntouched > 1) {     /* one changed inode is the object */
        void *own = object_of(spec, pc);
        if (own)
            *first = own;
    }
    struct event *e = syscall_event(EV_SYSCALL, pc, ret, flags);
    if (e) {
        e->rules = m.rules | pathless;
        e->name_rules = m.names;
    }
    return e;
}

/* The file behind an fd argument: its inode and path. */
static __always_inline void put_fd_path(struct event *e, void *file)
{
    if (!file)
        return;
    set_inode(e, read_ptr(file, OFF_FILE_F_INODE));
    e->n_base1 = put_path(e, read_ptr(file, OFF_FILE_F_PATH + OFF_PATH_DENTRY),
                          read_ptr(file, OFF_FILE_F_PATH + OFF_PATH_MNT));
}

/* Append what the syscall's arguments name (an fd's path, or base directory and path
 * argument, twice for two-path syscalls), then send the record. */
static __always_inline void report_paths(void *ctx, struct event *e,
                                         struct syscall_spec *spec, struct pending *pc,
                                         void *first)
{
    if (spec->fd >= 0) {
        put_fd_path(e, fd_file(pc->args[spec->fd & 7]));
    } else if (spec->path1 >= 0) {
        s64 dfd = spec->dfd1 >= 0 ? (s64)(s32)pc->args[spec->dfd1 & 7] : AT_FDCWD_VALUE;
        const void *upath = (const void *)pc->args[spec->path1 & 7];
        if (!upath && dfd >= 0) {
            /* utimensat(fd, NULL, ...) and friends: the fd itself */
            put_fd_path(e, fd_file(dfd));
        } else {
            e->n_base1 = put_base(e, dfd, 1);
            put_user_str(e, upath);
            e->has_name1 = 1;
        }
    }
    if (spec->path2 >= 0) {
        s64 dfd = spec->dfd2 >= 0 ? (s64)(s32)pc->args[spec->dfd2 & 7] : AT_FDCWD_VALUE;
        e->n_base2 = put_base(e, dfd, 2);
        put_user_str(e, (const void *)pc->args[spec->path2 & 7]);
        e->has_name2 = 1;
    }
    if (!e->ino && first)
        set_inode(e, first);
    if (e->kind == EV_SYSCALL)
        set_parents(e, pc, first);
    submit(ctx, e);
}

/* exit_tail: the ways a followed syscall's end is judged, each a program of its own
 * (build.py TAIL_CALLS), so that each is verified within the kernel's limit */
#define EXIT_OPEN       0       /* a successful open: exit_open */
#define EXIT_CHANGED    1       /* a success that changed inodes: exit_changed */
#define EXIT_FAILED     2       /* a failure, or a success that changed none: exit_failed */
#define EXIT_SCAN       3       /* ... whose names are scanned first: exit_scan */
BPF_PROG_ARRAY(exit_tail, 4);

/* A success whose changes grant nothing and leave nothing to do (exit_changed would
 * find the same): every changed inode was judged when it changed, or is settled by what
 * the one directory the syscall changed grants its entries (dir_current: nothing moved
 * and no watch changed since that verdict), namely a new entry (a create, a link) or a
 * file a rename or link named there (rejudged by its new name, as exit_changed does);
 * no path-less rule or audit of all paths, no file's own watch to forget, no walk left
 * to continue. */
static __always_inline int changed_settled(struct config *cfg, struct syscall_spec *spec,
                                           struct pending *pc, struct exit_state *x,
                                           int dir_current)
{
    struct deep_state *s = deep_state();
    if (x->any_object || (pc->perms & spec->perm) || pc->ntouched > MAX_TOUCHED ||
        pc->overflow || !s || s->short_dir)
        return 0;
    if (!cfg->have_watches)
        return 1;
    u64 quiet = dir_current && !(pc->dir_below & spec->perm) ? pc->dir : 0;
    int two = spec->path2 >= 0;
    for (int i = 0; i < MAX_TOUCHED; i++) {
        if (i >= pc->ntouched)
            break;
        void *inode = (void *)pc->touched[i];
        int dir = is_dir(inode);
        /* a file whose last name went: its own watch is forgotten there (forget_if_gone) */
        if (cfg->file_watches && !dir && !read_u32(inode, OFF_INODE_I_NLINK))
            return 0;
        int judged = (pc->judged >> i) & 1;
        if (judged && !two)
            continue;
        if ((u64)inode == quiet && quiet > DIRS_SEVERAL)
            continue;           /* the directory itself, judged at its change */
        void *dentry = inode_dentry(inode);
        if (!dentry) {
            if (judged)
                continue;       /* a name replaced: judged by it at its change */
            return 0;
        }
        if (dir || quiet <= DIRS_SEVERAL)
            return 0;
        void *parent = read_ptr(read_ptr(dentry, OFF_DENTRY_D_PARENT), OFF_DENTRY_D_INODE);
        if ((u64)parent != quiet)
            return 0;
        if (!judged && cfg->file_watches) {
            struct watch_key key = {};
            inode_key(inode, &key);
            if (watched.lookup(&key))
                return 0;       /* a new file a file watch already names */
        }
    }
    return 1;
}

RAW_TRACEPOINT_PROBE(sys_exit)
{
    /* every syscall ends here: leave at once unless it is one we follow */
    struct pending *pc = NULL;
    struct syscall_spec *spec = ending_syscall(ctx, &pc);
    if (!spec || !pc)
        return 0;
    s64 ret = (s64)ctx->args[1];
    if (spec->kind == KIND_EXEC && ret >= 0)
        return 0;               /* told in sched_process_exec */
    if (spec->kind == KIND_MOUNT) {
        if (ret >= 0)
            bump_kernel_gen();
        return 0;
    }
    /* before this syscall's own moves expire the verdicts (it moved no directory when
     * it is settled by its one directory's verdict) */
    int dir_current = pc->dir > DIRS_SEVERAL && pc->dir_kgen == gen(GEN_KERNEL) &&
                      pc->dir_ugen == gen(GEN_USER);
    if (ret >= 0 && spec->moves)
        note_moves(pc, spec);
    u32 zero = 0;
    struct config *cfg = config.lookup(&zero);
    if (!cfg || pc->scope == SCOPE_OUT)
        return 0;
    int all_paths = pc->scope == SCOPE_ALL_PATHS;
    struct exit_state *x = exit_states.lookup(&zero);
    if (!x)
        return 0;
    x->ret = ret;
    x->flags = syscall_flags(spec, pc);
    x->pathless = pathless_rules(spec, ret);
    /* reported whatever object it is on: a per-process audit of all paths, or a
     * path-less rule */
    x->any_object = (u64)all_paths | ((x->pathless | -x->pathless) >> 63);
    x->all_paths = all_paths;
    if (ret >= 0 && spec->kind == KIND_OPEN) {
        exit_tail.call(ctx, EXIT_OPEN);
    } else if (ret >= 0 && pc->ntouched) {
        if (changed_settled(cfg, spec, pc, x, dir_current))
            return 0;
        exit_tail.call(ctx, EXIT_CHANGED);
    } else {
        /* a failure: its names are scanned first, unless everything is reported
         * anyway or nothing is watched */
        x->scan_k = 0;
        x->upath[0] = x->upath[1] = 0;
        x->names[0] = x->names[1] = NAME_NONE;
        if (!all_paths && cfg->have_watches) {
            x->names[0] = name_arg(spec, pc, 0, &x->upath[0]);
            x->names[1] = name_arg(spec, pc, 1, &x->upath[1]);
        }
        exit_tail.call(ctx, EXIT_SCAN);
    }
    count(CNT_LOST);            /* the tail call failed */
    return 0;
}

/* The syscall ending, its spec and what sys_exit worked out, in an exit_tail program. */
static __always_inline struct exit_state *ending_state(struct pending **pc,
                                                       struct syscall_spec **spec)
{
    u32 zero = 0;
    struct exit_state *x = exit_states.lookup(&zero);
    *pc = ending.lookup(&zero);
    if (!x || !*pc)
        return NULL;
    *spec = syscall_spec.lookup(&(*pc)->tp_id);
    return *spec ? x : NULL;
}

int exit_open(struct bpf_raw_tracepoint_args *ctx)
{
    struct pending *pc;
    struct syscall_spec *spec;
    struct exit_state *x = ending_state(&pc, &spec);
    if (x)
        report_open(ctx, pc, x->ret, x->flags, x->any_object, x->pathless);
    return 0;
}

int exit_changed(struct bpf_raw_tracepoint_args *ctx)
{
    struct pending *pc;
    struct syscall_spec *spec;
    struct exit_state *x = ending_state(&pc, &spec);
    if (!x)
        return 0;
    void *first = NULL;
    struct event *e = changed_event(spec, pc, x->ret, x->flags, x->all_paths,
                                    x->any_object, x->pathless, &first);
    if (e)
        report_paths(ctx, e, spec, pc, first);
    return 0;
}

/* The name of path argument x->scan_k of a failure (see exit_failed), scanned into
 * fail_buf.names, then the next one's (a program per scan: the verifier meets the byte
 * loop once in each), then exit_failed.  Nothing to scan for a per-process audit of
 * all paths or without watches. */
int exit_scan(struct bpf_raw_tracepoint_args *ctx)
{
    u32 zero = 0;
    struct exit_state *x = exit_states.lookup(&zero);
    struct fail_buf *b = fail_scratch.lookup(&zero);
    if (!x || !b)
        return 0;
    u32 k = x->scan_k & 1;
    u8 name = x->names[k];
    if (name == NAME_SCAN) {
        if (bpf_probe_read_user_str(b->s, FAIL_SCAN, (const void *)x->upath[k]) <= 0)
            name = NAME_NONE;   /* EFAULT: no name, no object */
        else if (scan_failed_path(b))
            name = NAME_SEND;
        else
            name = b->s[0] == '/' ? NAME_CLEAR : NAME_REL;
    }
    x->names[k] = name;
    if (k == 0 && x->names[1] == NAME_SCAN) {
        x->scan_k = 1;
        exit_tail.call(ctx, EXIT_SCAN);
    } else {
        exit_tail.call(ctx, EXIT_FAILED);
    }
    count(CNT_LOST);            /* the tail call failed */
    return 0;
}

/* A failure, or a success that changed no inode (a removexattr of an absent attribute,
 * a truncate to the same size, a rename of two links to one inode): judged by its
 * names (Linux audit reports both), or by a path-less rule. */
int exit_failed(struct bpf_raw_tracepoint_args *ctx)
{
    struct pending *pc;
    struct syscall_spec *spec;
    struct exit_state *x = ending_state(&pc, &spec);
    u32 zero = 0;
    struct config *cfg = config.lookup(&zero);
    if (!x || !cfg)
        return 0;
    struct event *e = failed_event(cfg, x, spec, pc);
    if (!e && x->pathless)
        e = syscall_event(EV_FAILED, pc, x->ret, x->flags);
    if (!e)
        return 0;
    e->rules = x->pathless;
    report_paths(ctx, e, spec, pc, NULL);
    return 0;
}

/* ---- deep trees: a walk that ended short, continued (struct deep_state) ----------- */
/* Collect the chain of directories from s->next up to the top or to a directory judged
 * before (its verdict: s->top), DEEP_STEP levels per call; then judge it top down, each
 * level from its own watch and the verdict of the level above (as a walk that meets a
 * judged directory one level up does), keeping every verdict in dir_cache; then go on
 * in slot s->then.  A chain longer than DEEP_CHAIN is counted as lost. */
int deep_walk(struct bpf_raw_tracepoint_args *ctx)
{
    struct deep_state *s = deep_state();
    if (!s)
        return 0;
    if (!s->left) {
        struct walk w = {};
        w.dentry = (void *)s->next;
        int end = 0;
        for (u32 i = 0; i < DEEP_STEP; i++) {
            void *dentry = w.dentry;
            void *inode = dentry ? read_ptr(dentry, OFF_DENTRY_D_INODE) : NULL;
            if (!inode) {
                end = 1;
                break;
            }
            struct watch_key key = {};
            inode_key(inode, &key);
            struct dir_verdict *c = s->n ? dir_cache.lookup(&key) : NULL;
            if (c && c->kgen == s->kgen && c->ugen == s->ugen) {
                s->top = *c;
                s->have_top = 1;
                end = 1;
                break;
            }
            u32 n = s->n;
            if (n >= DEEP_CHAIN) {
                /* judged on what its first walk saw, and counted (deep_defer) */
                s->gave_up = 1;
                deep_tail.call(ctx, s->then);
                count(CNT_TOO_DEEP);
                return 0;
            }
            s->chain[n & (DEEP_CHAIN - 1)] = (u64)dentry;
            s->n = n + 1;
            if (walk_up(&w, dentry, read_ptr(inode, OFF_INODE_I_SB), 0)) {
                end = 1;
                break;
            }
        }
        s->next = (u64)w.dentry;
        s->left = end ? s->n : 0;
        if (!end || !s->n) {
            deep_tail.call(ctx, end ? s->then : DEEP_WALK);
            count(CNT_TOO_DEEP);
            return 0;
        }
    }
    for (u32 i = 0; i < DEEP_STEP; i++) {
        u32 left = s->left;
        if (!left)
            break;
        void *dentry = (void *)s->chain[(left - 1) & (DEEP_CHAIN - 1)];
        struct walk w = {};
        w.dentry = dentry;
        watch_step(0, &w, 0);
        if (s->have_top)
            use_verdict(1, &w, &s->top);
        struct dir_verdict v = {};
        v.kgen = s->kgen;
        v.ugen = s->ugen;
        v.own = w.perms;
        v.below = w.below;
        v.deep = w.deep;
        v.own_rules = w.rules;
        v.below_rules = w.below_rules;
        v.deep_rules = w.deep_rules;
        v.own_names = w.names;
        v.below_names = w.below_names;
        void *inode = read_ptr(dentry, OFF_DENTRY_D_INODE);
        if (inode) {
            struct watch_key key = {};
            inode_key(inode, &key);
            dir_cache.update(&key, &v);
        }
        s->top = v;
        s->have_top = 1;
        s->left = left - 1;
    }
    deep_tail.call(ctx, s->left ? DEEP_WALK : s->then);
    count(CNT_TOO_DEEP);
    return 0;
}

/* A ctime tracepoint's judgment, again after its walk was continued (another name of
 * the inode may need one more). */
int deep_ctime(struct bpf_raw_tracepoint_args *ctx)
{
    void *inode = (void *)ctx->args[0];
    struct pending *p = thread_pending(0);
    if (!p || !p->active)
        return 0;
    /* its place among the inodes the syscall changed, chosen without branches */
    u64 n = MAX_TOUCHED, nt = p->ntouched;
    OPAQUE(nt);
    for (u64 i = 0; i < MAX_TOUCHED; i++) {
        u64 here = is_zero64(p->touched[i] ^ (u64)inode) & ((i - nt) >> 63);
        OPAQUE(here);
        n = (n & (here - 1)) | (i & (0 - here));
    }
    OPAQUE(n);
    judge_changed(p, inode, n);
    deep_defer(ctx, DEEP_CTIME);
    return 0;
}

/* An open's judgment and record, again after its walk was continued. */
int deep_open(struct bpf_raw_tracepoint_args *ctx)
{
    struct deep_state *s = deep_state();
    u32 zero = 0;
    struct pending *pc = ending.lookup(&zero);
    if (!s || !pc)
        return 0;
    report_open(ctx, pc, s->ret, s->flags, s->any_object, s->pathless);
    return 0;
}

/* The rest of a record's last path (put_last_path), PATH_DEPTH components per call,
 * then the record is sent. */
int deep_path(struct bpf_raw_tracepoint_args *ctx)
{
    struct deep_state *s = deep_state();
    u32 zero = 0;
    struct event *e = scratch.lookup(&zero);
    if (!s || !e)
        return 0;
    long end = path_steps(e, &s->pw);
    e->n_base1 += e->walk_count;
    if (!end)
        path_goes_on(ctx, e);
    submit(ctx, e);
    return 0;
}

/* ---- exec: the program file decides ----------------------------------------------- */
/* A successful execve or execveat, told here with the new program's file and the
 * credentials it runs with (a set-user-ID program's euid, as Linux audit's record has
 * them); path-less rules on execve are judged here too.  A failed one ends in
 * sys_exit and is judged by its name there.  The syscall's state was started in
 * sched_prepare_exec, in the exec'ing thread (a thread other than the leader takes the
 * leader's id, not its task storage); sys_exit leaves a successful exec to this
 * program. */
/* An exec's syscall is read from the registers before the new program replaces them
 * (after that, they no longer tell execveat from execve). */
RAW_TRACEPOINT_PROBE(sched_prepare_exec)
{
    syscall_in_progress();
    return 0;
}

RAW_TRACEPOINT_PROBE(sched_process_exec)
{
    void *bprm = (void *)ctx->args[2];
    /* a new program: its records name it afresh (a freed exe file's memory may come
     * back as the new one's, so the pointer alone cannot tell them apart) */
    u32 exec_tgid = bpf_get_current_pid_tgid() >> 32;
    exe_sent.delete(&exec_tgid);
    void *file = read_ptr(bprm, OFF_BINPRM_FILE);
    if (!file)
        return 0;
    u64 pathless = 0;
    u32 tp_id = 0;
    struct pending *p = thread_pending(0);
    if (p && p->active) {
        tp_id = p->tp_id;
        struct syscall_spec *spec = syscall_spec.lookup(&tp_id);
        if (spec && spec->kind == KIND_EXEC)
            pathless = pathless_rules(spec, 0);
        p->active = 0;          /* told here: its end in sys_exit has nothing more to say */
    }
    u32 tgid;
    int all_paths;
    struct config *cfg = current_scope(&tgid, &all_paths);
    if (!cfg)
        return 0;
    void *dentry = read_ptr(file, OFF_FILE_F_PATH + OFF_PATH_DENTRY);
    void *mnt = read_ptr(file, OFF_FILE_F_PATH + OFF_PATH_MNT);
    struct match m = {};
    u8 perms = watched_perms(dentry, mnt, &m);
    deep_count();
    if (!(perms & PERM_X) && !all_paths && !pathless)
        return 0;
    struct event *e = new_event(EV_EXEC);
    if (!e)
        return 0;
    e->tp_id = tp_id;
    e->rules = m.rules | pathless;
    e->name_rules = m.names;
    set_inode(e, read_ptr(file, OFF_FILE_F_INODE));
    put_last_path(ctx, e, dentry, mnt);
    submit(ctx, e);
    return 0;
}

/* ---- per-process audits: follow forks, forget exits -------------------------------- */
RAW_TRACEPOINT_PROBE(sched_process_fork)
{
    void *parent = (void *)ctx->args[0];
    void *child = (void *)ctx->args[1];
    u32 ptgid = read_u32(parent, OFF_TASK_TGID);
    u32 ctgid = read_u32(child, OFF_TASK_TGID);
    if (ptgid == ctgid)
        return 0;               /* a new thread, not a new process */
    u32 zero = 0;
    struct config *cfg = config.lookup(&zero);
    u8 *flags = cfg && cfg->audits ? audited.lookup(&ptgid) : NULL;
    if (!flags || !(*flags & AUDIT_CHILDREN))
        return 0;
    u8 f = *flags;
    audited.update(&ctgid, &f);
    struct event *e = new_event(EV_STATE);
    if (!e)
        return 0;
    /* the record describes the child: the parent's credentials are inherited */
    e->ppid = ptgid;
    e->pid = ctgid;
    e->tid = read_u32(child, OFF_TASK_PID);
    e->nspid = task_nspid(child);
    submit(ctx, e);
    return 0;
}

RAW_TRACEPOINT_PROBE(sched_process_exit)
{
    void *task = (void *)ctx->args[0];
    u32 pid = read_u32(task, OFF_TASK_PID);
    u32 tgid = read_u32(task, OFF_TASK_TGID);
    if (pid == tgid) {
        audited.delete(&tgid);
        exe_sent.delete(&tgid);
    }
    return 0;
}

/* ---- io_uring: an open's completion (an existing file changes nothing at the open) ---
 * The fd is installed in the submitter's table, which its workers share, or the file
 * in a fixed file slot of the ring (uring_slot_file); a request that created its file
 * was reported from the worker (uring_created). */
#define FILE_INDEX_ALLOC 0xFFFFFFFF     /* IORING_FILE_INDEX_ALLOC (uapi): the kernel
                                         * picks the slot and returns it */

/* The file an open put in fixed file slot file_slot - 1 of the ring (or in the one
 * the kernel picked, res): the ring's table of slots (io_ring_ctx.file_table), whose
 * nodes hold the file pointer with flags in its low bits.  NULL where the kernel has
 * no such table. */
static __always_inline void *uring_slot_file(void *req, u32 file_slot, s32 res)
{
#ifdef OFF_IO_RSRC_NODE_FILE_PTR
    u32 index = file_slot == FILE_INDEX_ALLOC ? (u32)res : file_slot - 1;
    void *ctx = read_ptr(req, OFF_IO_KIOCB_CTX);
    if (!ctx)
        return NULL;
    void *table = (char *)ctx + OFF_IO_RING_CTX_FILE_TABLE + OFF_IO_FILE_TABLE_DATA;
    if (index >= read_u32(table, OFF_IO_RSRC_DATA_NR))
        return NULL;
    void *nodes = read_ptr(table, OFF_IO_RSRC_DATA_NODES);
    void *node = nodes ? read_ptr(nodes, (u64)index * sizeof(void *)) : NULL;
    if (!node)
        return NULL;
    return (void *)(read_u64(node, OFF_IO_RSRC_NODE_FILE_PTR) & ~7ULL);
#else
    return NULL;
#endif
}

TRACEPOINT_PROBE(io_uring, io_uring_complete)
{
    void *req = args->req;
    u8 opcode = read_u8(req, OFF_IO_KIOCB_OPCODE);
    if (opcode != IORING_OP_OPENAT && opcode != IORING_OP_OPENAT2)
        return 0;
    u64 key = (u64)req;
    if (uring_created.lookup(&key)) {
        uring_created.delete(&key);
        return 0;
    }
    s32 res = args->res;
    void *cmd = (char *)req + OFF_IO_KIOCB_CMD;
    if (res < 0)
        return 0;
    u32 file_slot = read_u32(cmd, OFF_IO_OPEN_FILE_SLOT);
    u32 tgid;
    int all_paths;
    struct config *cfg = current_scope(&tgid, &all_paths);
    if (!cfg)
        return 0;
    void *file = file_slot ? uring_slot_file(req, file_slot, res) : fd_file(res);
    if (!file)
        return 0;
    u64 flags = read_u64(cmd, OFF_IO_OPEN_HOW + OFF_OPEN_HOW_FLAGS);
    void *dentry = read_ptr(file, OFF_FILE_F_PATH + OFF_PATH_DENTRY);
    void *mnt = read_ptr(file, OFF_FILE_F_PATH + OFF_PATH_MNT);
    struct match m = {};
    u8 perms = watched_perms(dentry, mnt, &m);
    deep_count();
    if (!(perms & open_perm(flags, 0)) && !all_paths)
        return 0;
    struct event *e = new_event(EV_URING);
    if (!e)
        return 0;
    e->tp_id = opcode;
    e->ret = res;
    e->flags = URING_OPENED | ((flags & 0xFFFFFFFF) << URING_FLAGS_SHIFT);
    e->rules = m.rules;
    e->name_rules = m.names;
    set_inode(e, read_ptr(file, OFF_FILE_F_INODE));
    e->n_base1 = put_path(e, dentry, mnt);
    submit_now(args, e);    /* a tracepoint program: no tail call into send_tail */
    return 0;
}
