/*
 * The file-restore appliance's agent (SPEC 16.3): serves the volumes the appliance's init mounted under
 * /mnt over one virtio-serial port. Requests are lines, replies are frames:
 *
 *   request:  VERB [SP hex(arg)]... LF          (arguments hex-encoded: any byte but NUL, no quoting)
 *   frame:    type (1 byte) | length (u32, big endian) | payload
 *             'R' ready (sent once, when the port is open; payload "engine-files-agent 1")
 *             'D' data (at most 64 KiB)             'E' end: payload "<exit code> <message>"
 *
 *   VOLUMES       the table /run/volumes written by init (name TAB type TAB state TAB detail LF per volume)
 *   LS path       the entry at path and, if it is a directory, its children: per entry eight fields each
 *                 ended by NUL: type (f d l c b p s), mode (octal, 12 bits), size, mtime (s.ns), uid, gid,
 *                 name, link target
 *   TAR path      GNU tar (POSIX pax format, numeric owners, 512-byte records) of path, names starting
 *                 with path's last component; the data frames are the archive
 *   READ path offset length
 *                 at most `length` (decimal, 1 to 4 MiB) bytes of the regular file at path from `offset`
 *                 (decimal); fewer only at its end. Anything but a regular file is refused: a guest's FIFO
 *                 would block the agent, a device node would read the appliance's own devices.
 *
 * A path is "<volume>/<rest>"; <rest> is resolved inside the volume with openat2(RESOLVE_IN_ROOT), so a
 * guest's symlink (absolute or full of ..) never leads out of its volume into the appliance. Nothing is
 * ever written to a volume (they are mounted read-only on read-only disks anyway).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

static int port = -1;

static void write_all(const void *buffer, size_t length) {
  const char *p = buffer;
  while (length > 0) {
    ssize_t n = write(port, p, length);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      _exit(3);
    }
    p += n;
    length -= (size_t)n;
  }
}

static void frame(char type, const void *payload, uint32_t length) {
  unsigned char header[5] = {(unsigned char)type, length >> 24, length >> 16, length >> 8, length};
  write_all(header, 5);
  if (length > 0) write_all(payload, length);
}

static void end(int code, const char *message) {
  char text[1024];
  int n = snprintf(text, sizeof text, "%d %s", code, message);
  frame('E', text, (uint32_t)(n < (int)sizeof text ? n : (int)sizeof text - 1));
}

/* Data frames, batched into 64 KiB. */
static char out[65536];
static size_t out_length = 0;
static void flush_out(void) {
  if (out_length > 0) frame('D', out, (uint32_t)out_length);
  out_length = 0;
}
static void put(const void *data, size_t length) {
  const char *p = data;
  while (length > 0) {
    size_t n = sizeof out - out_length < length ? sizeof out - out_length : length;
    memcpy(out + out_length, p, n);
    out_length += n;
    p += n;
    length -= n;
    if (out_length == sizeof out) flush_out();
  }
}
static void put_field(const char *text) { put(text, strlen(text) + 1); }

static int unhex(const char *hex, size_t length, char *result, size_t room) {
  if (length % 2 != 0 || length / 2 >= room) return -1;
  for (size_t i = 0; i < length; i += 2) {
    unsigned int byte;
    if (sscanf(hex + i, "%2x", &byte) != 1 || byte == 0) return -1;
    result[i / 2] = (char)byte;
  }
  result[length / 2] = 0;
  return 0;
}

/*
 * The volume a path names (the longest volume name in /run/volumes that is a whole-component prefix of it)
 * and an O_PATH descriptor of what the rest names inside it, symlinks resolved as if the volume were "/".
 * Writes the appliance path of what was found to `real`. Returns the descriptor or -1 (message set).
 */
static int resolve(const char *path, char *real, size_t room, const char **message) {
  FILE *volumes = fopen("/run/volumes", "r");
  if (!volumes) { *message = "no volume table"; return -1; }
  char line[4096], best[4096] = "";
  while (fgets(line, sizeof line, volumes)) {
    char *tab = strchr(line, '\t');
    if (!tab) continue;
    *tab = 0;
    char *state = strchr(tab + 1, '\t');
    if (!state || strncmp(state + 1, "mounted", 7) != 0) continue;
    size_t n = strlen(line);
    if (strncmp(path, line, n) == 0 && (path[n] == 0 || path[n] == '/') && n > strlen(best)) strcpy(best, line);
  }
  fclose(volumes);
  if (!best[0]) { *message = "no mounted volume of that name"; return -1; }
  char root[4200];
  snprintf(root, sizeof root, "/mnt/%s", best);
  int root_fd = open(root, O_PATH | O_DIRECTORY);
  if (root_fd < 0) { *message = strerror(errno); return -1; }
  const char *rest = path + strlen(best);
  while (*rest == '/') rest++;
  struct open_how how = {.flags = O_PATH | O_NOFOLLOW, .resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS};
  int fd = (int)syscall(SYS_openat2, root_fd, *rest ? rest : ".", &how, sizeof how);
  close(root_fd);
  if (fd < 0) { *message = strerror(errno); return -1; }
  char link[64];
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(link, real, room - 1);
  if (n < 0) { *message = strerror(errno); close(fd); return -1; }
  real[n] = 0;
  return fd;
}

static char type_of(mode_t mode) {
  if (S_ISREG(mode)) return 'f';
  if (S_ISDIR(mode)) return 'd';
  if (S_ISLNK(mode)) return 'l';
  if (S_ISCHR(mode)) return 'c';
  if (S_ISBLK(mode)) return 'b';
  if (S_ISFIFO(mode)) return 'p';
  return 's';
}

static void put_entry(int dir_fd, const char *name, const char *display) {
  struct stat st;
  if (fstatat(dir_fd, name, &st, AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH) != 0) return;
  char field[64], target[4096] = "";
  field[0] = type_of(st.st_mode);
  field[1] = 0;
  put_field(field);
  snprintf(field, sizeof field, "%o", (unsigned)(st.st_mode & 07777));
  put_field(field);
  snprintf(field, sizeof field, "%lld", (long long)st.st_size);
  put_field(field);
  snprintf(field, sizeof field, "%lld.%09ld", (long long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
  put_field(field);
  snprintf(field, sizeof field, "%u", st.st_uid);
  put_field(field);
  snprintf(field, sizeof field, "%u", st.st_gid);
  put_field(field);
  put_field(display);
  if (S_ISLNK(st.st_mode)) {
    ssize_t n = readlinkat(dir_fd, name, target, sizeof target - 1);
    target[n < 0 ? 0 : n] = 0;
  }
  put_field(target);
}

static void list(const char *path) {
  char real[4096];
  const char *message = "";
  int fd = resolve(path, real, sizeof real, &message);
  if (fd < 0) { end(2, message); return; }
  const char *base = strrchr(real, '/');
  put_entry(fd, "", base && base[1] ? base + 1 : real);
  struct stat st;
  if (fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
    int dir_fd = open(real, O_RDONLY | O_DIRECTORY | O_NOFOLLOW);
    DIR *dir = dir_fd < 0 ? NULL : fdopendir(dir_fd);
    if (!dir) { close(fd); flush_out(); end(2, strerror(errno)); return; }
    struct dirent *entry;
    while ((entry = readdir(dir))) {
      if (strcmp(entry->d_name, ".") == 0 || strcmp(entry->d_name, "..") == 0) continue;
      put_entry(dirfd(dir), entry->d_name, entry->d_name);
    }
    closedir(dir);
  }
  close(fd);
  flush_out();
  end(0, "");
}

static void archive(const char *path) {
  char real[4096];
  const char *message = "";
  int fd = resolve(path, real, sizeof real, &message);
  if (fd < 0) { end(2, message); return; }
  close(fd);
  char parent[4096];
  strcpy(parent, real);
  char *slash = strrchr(parent, '/');
  const char *name = slash[1] ? slash + 1 : ".";
  if (slash == parent) parent[1] = 0; else *slash = 0;
  int data[2], errors[2];
  if (pipe(data) != 0 || pipe(errors) != 0) { end(2, strerror(errno)); return; }
  pid_t child = fork();
  if (child == 0) {
    dup2(data[1], 1);
    dup2(errors[1], 2);
    close(data[0]); close(errors[0]); close(data[1]); close(errors[1]);
    execl("/bin/tar", "tar", "--create", "--file=-", "--format=posix", "--numeric-owner", "--blocking-factor=1",
          "--directory", parent, "--", name, (char *)NULL);
    _exit(127);
  }
  close(data[1]);
  close(errors[1]);
  /* stderr is read after stdout ends; tar writes little there, so the pipe's 64 KiB never fill. */
  char buffer[65536];
  ssize_t n;
  while ((n = read(data[0], buffer, sizeof buffer)) != 0) {
    if (n < 0) { if (errno == EINTR) continue; break; }
    frame('D', buffer, (uint32_t)n);
  }
  close(data[0]);
  char error_text[900];
  size_t error_length = 0;
  while (error_length < sizeof error_text - 1 && (n = read(errors[0], error_text + error_length, sizeof error_text - 1 - error_length)) > 0) error_length += (size_t)n;
  error_text[error_length] = 0;
  close(errors[0]);
  for (char *c = error_text; *c; c++) if (*c == '\n') *c = ' ';
  int status = 0;
  waitpid(child, &status, 0);
  end(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), error_text);
}

#define READ_MAX (4u * 1024 * 1024)

static int decimal(const char *text, unsigned long long *value) {
  char *rest;
  if (!*text || *text < '0' || *text > '9') return -1;
  errno = 0;
  *value = strtoull(text, &rest, 10);
  return errno != 0 || *rest ? -1 : 0;
}

static void read_range(const char *path, const char *offset_text, const char *length_text) {
  unsigned long long offset, length;
  if (decimal(offset_text, &offset) != 0 || decimal(length_text, &length) != 0 || length == 0 || length > READ_MAX || offset > (unsigned long long)INT64_MAX) {
    end(1, "bad offset or length");
    return;
  }
  char real[4096];
  const char *message = "";
  int at = resolve(path, real, sizeof real, &message);
  if (at < 0) { end(2, message); return; }
  struct stat st;
  if (fstat(at, &st) != 0 || !S_ISREG(st.st_mode)) { close(at); end(2, "not a regular file"); return; }
  /* The O_PATH descriptor reopened for reading: the very file resolve() found, no second lookup by name. */
  char link[64];
  snprintf(link, sizeof link, "/proc/self/fd/%d", at);
  int fd = open(link, O_RDONLY | O_NOCTTY);
  close(at);
  if (fd < 0) { end(2, strerror(errno)); return; }
  static char buffer[65536];
  while (length > 0) {
    ssize_t n = pread(fd, buffer, length < sizeof buffer ? length : sizeof buffer, (off_t)offset);
    if (n < 0) {
      if (errno == EINTR) continue;
      close(fd);
      flush_out();
      end(2, strerror(errno));
      return;
    }
    if (n == 0) break;
    put(buffer, (size_t)n);
    offset += (unsigned long long)n;
    length -= (unsigned long long)n;
  }
  close(fd);
  flush_out();
  end(0, "");
}

int main(int argc, char **argv) {
  const char *device = argc > 1 ? argv[1] : "/dev/virtio-ports/org.engine.files.0";
  port = open(device, O_RDWR);
  if (port < 0) { perror(device); return 1; }
  frame('R', "engine-files-agent 1", 20);
  static char line[65536 * 2 + 64];
  size_t length = 0;
  for (;;) {
    char c;
    ssize_t n = read(port, &c, 1);
    if (n <= 0) {
      /* No host on the other end yet (or it went away): wait for one. */
      if (n < 0 && errno != EINTR && errno != EAGAIN) usleep(100000);
      if (n == 0) usleep(100000);
      continue;
    }
    if (c != '\n') {
      if (length < sizeof line - 1) line[length++] = c;
      continue;
    }
    line[length] = 0;
    length = 0;
    char *verb = strtok(line, " ");
    char *arg = strtok(NULL, " ");
    char *second = strtok(NULL, " ");
    char *third = strtok(NULL, " ");
    static char path[65536];
    char offset_text[32], length_text[32];
    if (!verb) continue;
    if (strcmp(verb, "VOLUMES") == 0) {
      FILE *volumes = fopen("/run/volumes", "r");
      char buffer[4096];
      size_t got;
      while (volumes && (got = fread(buffer, 1, sizeof buffer, volumes)) > 0) put(buffer, got);
      if (volumes) fclose(volumes);
      flush_out();
      end(volumes ? 0 : 2, volumes ? "" : "no volume table");
    } else if ((strcmp(verb, "LS") == 0 || strcmp(verb, "TAR") == 0) && arg && unhex(arg, strlen(arg), path, sizeof path) == 0) {
      if (verb[0] == 'L') list(path); else archive(path);
    } else if (strcmp(verb, "READ") == 0 && arg && second && third && unhex(arg, strlen(arg), path, sizeof path) == 0 &&
               unhex(second, strlen(second), offset_text, sizeof offset_text) == 0 && unhex(third, strlen(third), length_text, sizeof length_text) == 0) {
      read_range(path, offset_text, length_text);
    } else {
      end(1, "bad request");
    }
  }
}
