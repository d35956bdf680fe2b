/*
 * Lab-only LD_PRELOAD library for slurmd (and the slurmstepds it starts) on the cgroup v2
 * lab generation. NEVER installed on a node, never loaded into sshd, the broker or PAM.
 *
 * Why: this host's cgroups are hybrid (v1 controllers plus a controller-less cgroup2
 * hierarchy). The lab binds that cgroup2 hierarchy at each v2 node's /sys/fs/cgroup, but
 * Slurm's cgroup/v2 plugin also reads /proc/1/cgroup and /proc/self/cgroup and stops with
 * "Hybrid mode is not supported" unless their first line is the unified "0::" one. Those
 * files list every hierarchy of the kernel, whatever the mount namespace. So this library
 * answers read-only opens of /proc/{self,thread-self,<pid>,<pid>/task/<tid>}/cgroup with a
 * memfd holding only the "0::" line; every other call goes to libc unchanged.
 * (docs/generations.md, "cgroup v2 on a hybrid host".)
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* After "<digits>/" at `p`, or NULL if `p` does not start so. */
static const char *number_dir(const char *p)
{
	if (*p < '0' || *p > '9')
		return NULL;
	while (*p >= '0' && *p <= '9')
		p++;
	return *p == '/' ? p + 1 : NULL;
}

/* Is `path` the cgroup file of a process or thread under /proc? */
static int is_proc_cgroup(const char *path)
{
	const char *p;
	if (path == NULL || strncmp(path, "/proc/", 6) != 0)
		return 0;
	p = path + 6;
	if (strncmp(p, "self/", 5) == 0)
		p += 5;
	else if (strncmp(p, "thread-self/", 12) == 0)
		p += 12;
	else {
		if ((p = number_dir(p)) == NULL)
			return 0;
		if (strncmp(p, "task/", 5) == 0 && (p = number_dir(p + 5)) == NULL)
			return 0;
	}
	return strcmp(p, "cgroup") == 0;
}

static int (*real_openat)(int, const char *, int, ...);

/* libc's openat (looked up once; a race only looks it up twice). */
static int (*next_openat(void))(int, const char *, int, ...)
{
	if (!real_openat)
		real_openat = dlsym(RTLD_NEXT, "openat");
	return real_openat;
}

/* A memfd with the "0::" line(s) of the real file, positioned at 0; -1 on any failure. */
static int unified_only(int dirfd, const char *path)
{
	char buf[8192], out[8192];
	size_t len = 0, used = 0;
	ssize_t n;
	int fd, mfd;
	const char *line;

	fd = next_openat()(dirfd, path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	while (len < sizeof(buf) - 1 &&
	       (n = read(fd, buf + len, sizeof(buf) - 1 - len)) > 0)
		len += (size_t)n;
	close(fd);
	buf[len] = '\0';
	for (line = buf; *line; ) {
		const char *end = strchr(line, '\n');
		size_t size = end ? (size_t)(end - line + 1) : strlen(line);
		if (strncmp(line, "0::", 3) == 0 && used + size <= sizeof(out)) {
			memcpy(out + used, line, size);
			used += size;
		}
		line += size;
	}
	mfd = memfd_create("lab-proc-cgroup", MFD_CLOEXEC);
	if (mfd < 0)
		return -1;
	if (write(mfd, out, used) != (ssize_t)used || lseek(mfd, 0, SEEK_SET) != 0) {
		close(mfd);
		return -1;
	}
	return mfd;
}

static int wanted(const char *path, int flags)
{
	return (flags & O_ACCMODE) == O_RDONLY && is_proc_cgroup(path);
}

static int do_openat(int dirfd, const char *path, int flags, mode_t mode)
{
	if (wanted(path, flags)) {
		int fd = unified_only(dirfd, path);
		if (fd >= 0)
			return fd;
	}
	return next_openat()(dirfd, path, flags, mode);
}

#define MODE_ARG(flags, mode) do { \
	if ((flags) & (O_CREAT | O_TMPFILE)) { \
		va_list ap; va_start(ap, flags); mode = va_arg(ap, mode_t); va_end(ap); \
	} } while (0)

int open(const char *path, int flags, ...)
{ mode_t mode = 0; MODE_ARG(flags, mode); return do_openat(AT_FDCWD, path, flags, mode); }
int open64(const char *path, int flags, ...)
{ mode_t mode = 0; MODE_ARG(flags, mode); return do_openat(AT_FDCWD, path, flags, mode); }
int openat(int dirfd, const char *path, int flags, ...)
{ mode_t mode = 0; MODE_ARG(flags, mode); return do_openat(dirfd, path, flags, mode); }
int openat64(int dirfd, const char *path, int flags, ...)
{ mode_t mode = 0; MODE_ARG(flags, mode); return do_openat(dirfd, path, flags, mode); }
/* _FORTIFY_SOURCE builds call these. */
int __open_2(const char *path, int flags) { return do_openat(AT_FDCWD, path, flags, 0); }
int __open64_2(const char *path, int flags) { return do_openat(AT_FDCWD, path, flags, 0); }
int __openat_2(int dirfd, const char *path, int flags)
{ return do_openat(dirfd, path, flags, 0); }
int __openat64_2(int dirfd, const char *path, int flags)
{ return do_openat(dirfd, path, flags, 0); }

static FILE *do_fopen(const char *path, const char *how, const char *sym)
{
	FILE *(*real)(const char *, const char *) = dlsym(RTLD_NEXT, sym);
	if (strcmp(how, "r") == 0 || strcmp(how, "re") == 0) {
		if (is_proc_cgroup(path)) {
			int fd = unified_only(AT_FDCWD, path);
			if (fd >= 0) {
				FILE *f = fdopen(fd, "r");
				if (f)
					return f;
				close(fd);
			}
		}
	}
	return real(path, how);
}

FILE *fopen(const char *path, const char *how) { return do_fopen(path, how, "fopen"); }
FILE *fopen64(const char *path, const char *how) { return do_fopen(path, how, "fopen64"); }
