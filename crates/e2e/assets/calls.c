/*
 * calls: exercises the socket calls libvsocket.so intercepts, one focused
 * check each, between two guests.
 *
 *   calls server ADDR PORT
 *   calls client ADDR PORT
 *
 * The client opens one connection per scenario; its first byte tells the
 * server what to do. The client prints "ok NAME" or "FAIL NAME: why" per
 * check and exits non-zero if any check failed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/select.h>
#include <sys/time.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static int failures;
static volatile sig_atomic_t sigpipes;

#define CHECK(name, cond, ...)                                       \
    do {                                                             \
        if (cond) {                                                  \
            printf("ok %s\n", name);                                 \
        } else {                                                     \
            printf("FAIL %s: ", name);                               \
            printf(__VA_ARGS__);                                     \
            printf(" (errno %d %s)\n", errno, strerror(errno));      \
            failures++;                                              \
        }                                                            \
        fflush(stdout);                                              \
    } while (0)

#define SKIP(name, ...)                                              \
    do {                                                             \
        printf("skip %s: ", name);                                   \
        printf(__VA_ARGS__);                                         \
        printf("\n");                                               \
        fflush(stdout);                                              \
    } while (0)

static struct sockaddr_in addr_of(const char *ip, int port) {
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(port);
    inet_pton(AF_INET, ip, &sa.sin_addr);
    return sa;
}

static ssize_t read_full(int fd, char *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r <= 0) return r < 0 ? r : (ssize_t)got;
        got += r;
    }
    return got;
}

/* ---- server ------------------------------------------------------------ */

static void serve_one(int c) {
    char cmd;
    int fl = fcntl(c, F_GETFL), fdfl = fcntl(c, F_GETFD);
    char status = ((fl & O_NONBLOCK) ? 1 : 0) | ((fdfl & FD_CLOEXEC) ? 2 : 0);
    fcntl(c, F_SETFL, fl & ~O_NONBLOCK);
    if (read_full(c, &cmd, 1) != 1) { close(c); return; }
    char buf[65536];
    ssize_t n;
    switch (cmd) {
    case 'E': /* report accept4 flags, then echo until EOF */
        write(c, &status, 1);
        while ((n = read(c, buf, sizeof buf)) > 0) write(c, buf, n);
        break;
    case 'C': /* close at once */
        break;
    case 'R': /* close with unread data: a reset */
        usleep(200000);
        break;
    case 'H': /* half-close: "bye", FIN, then drain and report the count */
        write(c, "bye", 3);
        shutdown(c, SHUT_WR);
        while ((n = read(c, buf, sizeof buf)) > 0) {}
        break;
    case 'I': { /* report the options inherited from the listener */
        int ka = 0, nd = 0;
        socklen_t len = sizeof ka;
        getsockopt(c, SOL_SOCKET, SO_KEEPALIVE, &ka, &len);
        len = sizeof nd;
        getsockopt(c, IPPROTO_TCP, TCP_NODELAY, &nd, &len);
        struct timeval tv = {0, 0};
        len = sizeof tv;
        getsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, &len);
        struct linger lg = {0, 0};
        len = sizeof lg;
        getsockopt(c, SOL_SOCKET, SO_LINGER, &lg, &len);
        char report[64];
        int n = snprintf(report, sizeof report, "k=%d n=%d t=%ld l=%d/%d", ka != 0, nd != 0, (long)tv.tv_sec, lg.l_onoff != 0, lg.l_linger);
        write(c, report, n);
        break;
    }
    case 'L': /* SO_LINGER {1, 0}: close sends a reset */
        {
            struct linger lg = {1, 0};
            setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        }
        break;
    case 'W': /* ten paced writes, for MSG_WAITALL */
        memset(buf, 'w', 1000);
        for (int i = 0; i < 10; i++) { write(c, buf, 1000); usleep(20000); }
        read(c, buf, 1);
        break;
    }
    close(c);
}

static int server(const char *ip, int port) {
    int l = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    /* Options accepted sockets inherit (accept_inherits_listener_options). */
    setsockopt(l, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    setsockopt(l, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct timeval inherited_timeout = {30, 0};
    setsockopt(l, SOL_SOCKET, SO_RCVTIMEO, &inherited_timeout, sizeof inherited_timeout);
    struct linger inherited_linger = {1, 3};
    setsockopt(l, SOL_SOCKET, SO_LINGER, &inherited_linger, sizeof inherited_linger);
    struct sockaddr_in sa = addr_of(ip, port);
    if (bind(l, (struct sockaddr *)&sa, sizeof sa) || listen(l, 16)) { perror("listen"); return 1; }
    for (;;) {
        fd_set r;
        FD_ZERO(&r);
        FD_SET(l, &r);
        if (pselect(l + 1, &r, NULL, NULL, NULL, NULL) < 0) continue;
        struct sockaddr_in peer;
        socklen_t len = sizeof peer;
        int c = accept4(l, (struct sockaddr *)&peer, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (c >= 0) serve_one(c);
    }
}

/* ---- client ------------------------------------------------------------ */

static int connect_to(struct sockaddr_in *sa, char cmd) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(s, (struct sockaddr *)sa, sizeof *sa)) { perror("connect"); exit(2); }
    write(s, &cmd, 1);
    return s;
}

/* Reads exactly n bytes with recv(MSG_WAITALL) and compares them. */
static int arrives(int s, const char *want, size_t n) {
    char got[8192];
    if (n > sizeof got) return 0;
    return recv(s, got, n, MSG_WAITALL) == (ssize_t)n && memcmp(got, want, n) == 0;
}

/* MSG_MORE and TCP_CORK: the bytes arrive, whole and in order. */
static void check_cork(int s) {
    CHECK("msg_more", send(s, "more", 4, MSG_MORE) == 4 && send(s, "-done", 5, 0) == 5 && arrives(s, "more-done", 9), "MSG_MORE");
    int on = 1, off = 0, v = 0;
    socklen_t len = sizeof v;
    int set = setsockopt(s, IPPROTO_TCP, TCP_CORK, &on, sizeof on);
    getsockopt(s, IPPROTO_TCP, TCP_CORK, &v, &len);
    int sent = write(s, "cor", 3) == 3 && write(s, "ked", 3) == 3;
    int unset = setsockopt(s, IPPROTO_TCP, TCP_CORK, &off, sizeof off);
    CHECK("tcp_cork", set == 0 && v == 1 && sent && unset == 0 && arrives(s, "corked", 6), "TCP_CORK set %d v %d", set, v);
}

/* sendmmsg and recvmmsg on a stream socket. */
static void check_mmsg(int s) {
    char *parts[3] = {"one", "two!", "three"};
    struct iovec sv[3];
    struct mmsghdr sm[3];
    memset(sm, 0, sizeof sm);
    for (int i = 0; i < 3; i++) {
        sv[i].iov_base = parts[i];
        sv[i].iov_len = strlen(parts[i]);
        sm[i].msg_hdr.msg_iov = &sv[i];
        sm[i].msg_hdr.msg_iovlen = 1;
    }
    int r = sendmmsg(s, sm, 3, 0);
    CHECK("sendmmsg", r == 3 && sm[0].msg_len == 3 && sm[1].msg_len == 4 && sm[2].msg_len == 5, "sendmmsg %d", r);
    /* MSG_WAITALL fills each message in turn. */
    char b[4][8];
    struct iovec rv[4];
    struct mmsghdr rm[4];
    size_t sizes[4] = {5, 4, 3, 8};
    memset(rm, 0, sizeof rm);
    for (int i = 0; i < 4; i++) {
        rv[i].iov_base = b[i];
        rv[i].iov_len = sizes[i];
        rm[i].msg_hdr.msg_iov = &rv[i];
        rm[i].msg_hdr.msg_iovlen = 1;
    }
    r = recvmmsg(s, rm, 3, MSG_WAITALL, NULL);
    CHECK("recvmmsg", r == 3 && rm[0].msg_len == 5 && rm[1].msg_len == 4 && rm[2].msg_len == 3 && memcmp(b[0], "onetw", 5) == 0 && memcmp(b[1], "o!th", 4) == 0 && memcmp(b[2], "ree", 3) == 0, "recvmmsg %d", r);
    /* MSG_WAITFORONE: after the first message, only what is there. */
    r = sendmmsg(s, sm, 3, 0);
    char all[12];
    int there = r == 3 && recv(s, all, 12, MSG_PEEK | MSG_WAITALL) == 12;
    r = recvmmsg(s, rm, 4, MSG_WAITFORONE, NULL);
    CHECK("recvmmsg_waitforone", there && r == 3 && rm[0].msg_len == 5 && rm[1].msg_len == 4 && rm[2].msg_len == 3 && memcmp(b[2], "ree", 3) == 0, "recvmmsg %d", r);
    r = recvmmsg(s, rm, 2, MSG_DONTWAIT, NULL);
    CHECK("recvmmsg_empty", r == -1 && errno == EAGAIN, "recvmmsg %d", r);
}

struct drainer {
    int fd;
    ssize_t len;
    ssize_t got;
};

/* Empties a pipe a moment later. */
static void *drain_later(void *arg) {
    struct drainer *d = arg;
    usleep(100 * 1000);
    char buf[4096];
    d->got = 0;
    while (d->got < d->len) {
        ssize_t r = read(d->fd, buf, d->len - d->got < (ssize_t)sizeof buf ? d->len - d->got : (ssize_t)sizeof buf);
        if (r <= 0) break;
        d->got += r;
    }
    return NULL;
}

/* socket -> a full pipe: EAGAIN when the call may not wait (the flag, or a
 * non-blocking pipe), else a wait until the pipe has room; nothing lost. */
static void check_splice_into_full_pipe(int s, const char *content) {
    int q[2];
    pipe(q);
    fcntl(q[1], F_SETPIPE_SZ, 4096);
    fcntl(q[1], F_SETFL, O_NONBLOCK);
    char fill[4096];
    memset(fill, 'z', sizeof fill);
    ssize_t filled = 0, r;
    while ((r = write(q[1], fill, sizeof fill)) > 0) filled += r;
    /* Nothing to read yet, and the call may not wait: EAGAIN at once. */
    ssize_t empty = splice(s, NULL, q[1], NULL, 100, SPLICE_F_NONBLOCK);
    int empty_errno = errno;
    write(s, content, 100);
    char peeked[100];
    int there = recv(s, peeked, 100, MSG_PEEK | MSG_WAITALL) == 100;
    ssize_t flagged = splice(s, NULL, q[1], NULL, 100, SPLICE_F_NONBLOCK);
    int flagged_errno = errno;
    ssize_t nonblocking = splice(s, NULL, q[1], NULL, 100, 0);
    int nonblocking_errno = errno;
    fcntl(q[1], F_SETFL, 0);
    struct drainer d = {.fd = q[0], .len = filled};
    pthread_t t;
    pthread_create(&t, NULL, drain_later, &d);
    ssize_t waited = 0;
    while (waited < 100 && (r = splice(s, NULL, q[1], NULL, 100 - waited, 0)) > 0) waited += r;
    pthread_join(t, NULL);
    char back[100];
    CHECK("splice_socket_to_full_pipe",
          there && filled > 0 && empty == -1 && empty_errno == EAGAIN && flagged == -1 && flagged_errno == EAGAIN &&
              nonblocking == -1 &&
              nonblocking_errno == EAGAIN && d.got == filled && waited == 100 && read_full(q[0], back, 100) == 100 &&
              memcmp(back, content, 100) == 0,
          "filled %zd, empty socket %zd (%d), flagged %zd (%d), non-blocking pipe %zd (%d), drained %zd, then %zd",
          filled, empty, empty_errno, flagged, flagged_errno, nonblocking, nonblocking_errno, d.got, waited);
    close(q[0]);
    close(q[1]);
}

/* splice: file -> pipe (kernel) -> socket, and socket -> pipe. */
static void check_splice(int s) {
    char path[] = "/tmp/calls-splice-XXXXXX";
    int file = mkstemp(path);
    unlink(path);
    char content[6000];
    for (int i = 0; i < 6000; i++) content[i] = (char)('a' + i % 23);
    write(file, content, sizeof content);
    lseek(file, 0, SEEK_SET);
    int p[2];
    pipe(p);
    ssize_t in = splice(file, NULL, p[1], NULL, 6000, 0);
    ssize_t out = 0, r;
    while (out < in && (r = splice(p[0], NULL, s, NULL, in - out, 0)) > 0) out += r;
    CHECK("splice_pipe_to_socket", in == 6000 && out == 6000 && arrives(s, content, 6000), "splice in %zd out %zd", in, out);
    r = splice(p[0], NULL, s, NULL, 100, SPLICE_F_NONBLOCK);
    CHECK("splice_empty_pipe_nonblock", r == -1 && errno == EAGAIN, "splice %zd", r);
    write(s, content, 3000);
    ssize_t moved = 0;
    while (moved < 3000 && (r = splice(s, NULL, p[1], NULL, 3000 - moved, 0)) > 0) moved += r;
    char back[3000];
    CHECK("splice_socket_to_pipe", moved == 3000 && read_full(p[0], back, 3000) == 3000 && memcmp(back, content, 3000) == 0, "moved %zd", moved);
    check_splice_into_full_pipe(s, content);
    loff_t off = 0;
    r = splice(p[0], NULL, s, &off, 1, 0);
    CHECK("splice_offset_on_socket", r == -1 && errno == EINVAL, "splice %zd", r);
    close(p[0]);
    close(p[1]);
    close(file);
}

struct waiter {
    int ep;
    int woken;
};

static void *epoll_waiter(void *arg) {
    struct waiter *w = arg;
    struct epoll_event ev;
    w->woken = epoll_wait(w->ep, &ev, 1, 2000);
    return NULL;
}

/* One socket in two sets; a set inside a set; EPOLLEXCLUSIVE. */
static void check_epoll_sets(int s) {
    int e1 = epoll_create1(0), e2 = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 7}, got[4];
    epoll_ctl(e1, EPOLL_CTL_ADD, s, &ev);
    epoll_ctl(e2, EPOLL_CTL_ADD, s, &ev);
    int idle = epoll_wait(e1, got, 4, 0) + epoll_wait(e2, got, 4, 0);
    write(s, "x", 1);
    int r1 = epoll_wait(e1, got, 4, 2000);
    int r2 = epoll_wait(e2, got, 4, 2000);
    char c;
    CHECK("epoll_two_sets", idle == 0 && r1 == 1 && r2 == 1 && got[0].data.u64 == 7 && read(s, &c, 1) == 1, "idle %d, %d and %d", idle, r1, r2);
    close(e1);
    close(e2);

    int inner = epoll_create1(0), outer = epoll_create1(0);
    ev.data.u64 = 8;
    epoll_ctl(inner, EPOLL_CTL_ADD, s, &ev);
    struct epoll_event oev = {.events = EPOLLIN, .data.u64 = 9};
    int added = epoll_ctl(outer, EPOLL_CTL_ADD, inner, &oev);
    int loop = epoll_ctl(inner, EPOLL_CTL_ADD, outer, &oev) == -1 && errno == ELOOP;
    idle = epoll_wait(outer, got, 4, 100);
    write(s, "y", 1);
    int outer_ready = epoll_wait(outer, got, 4, 2000);
    int which = outer_ready == 1 && got[0].data.u64 == 9 && (got[0].events & EPOLLIN);
    int inner_ready = epoll_wait(inner, got, 4, 0);
    int inner_which = inner_ready == 1 && got[0].data.u64 == 8;
    int drained = read(s, &c, 1) == 1 && c == 'y';
    int after = epoll_wait(inner, got, 4, 0) + epoll_wait(outer, got, 4, 0);
    CHECK("epoll_nested", added == 0 && loop && idle == 0 && which && inner_which && drained && after == 0, "added %d loop %d idle %d outer %d inner %d after %d", added, loop, idle, outer_ready, inner_ready, after);
    close(outer);
    close(inner);

    /* EPOLLEXCLUSIVE: accepted on ADD (not on MOD); a waiter wakes. */
    struct waiter w[3];
    pthread_t t[3];
    int ok = 1;
    ev.events = EPOLLIN | EPOLLEXCLUSIVE;
    for (int i = 0; i < 3; i++) {
        w[i].ep = epoll_create1(0);
        w[i].woken = -1;
        ok &= epoll_ctl(w[i].ep, EPOLL_CTL_ADD, s, &ev) == 0;
    }
    int mod = epoll_ctl(w[0].ep, EPOLL_CTL_MOD, s, &ev) == -1 && errno == EINVAL;
    for (int i = 0; i < 3; i++) pthread_create(&t[i], NULL, epoll_waiter, &w[i]);
    usleep(100000);
    write(s, "z", 1);
    int woken = 0;
    for (int i = 0; i < 3; i++) {
        pthread_join(t[i], NULL);
        woken += w[i].woken == 1;
        close(w[i].ep);
    }
    CHECK("epoll_exclusive", ok && mod && woken >= 1 && read(s, &c, 1) == 1 && c == 'z', "added %d mod-EINVAL %d woken %d", ok, mod, woken);
}

/* Descriptors above 65535. */
static void check_high_fds(int s) {
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    struct rlimit want = {200000, rl.rlim_max < 200000 ? 200000 : rl.rlim_max};
    if (setrlimit(RLIMIT_NOFILE, &want) != 0) {
        want.rlim_max = rl.rlim_max;
        want.rlim_cur = rl.rlim_max;
        if (rl.rlim_max <= 150000 || setrlimit(RLIMIT_NOFILE, &want) != 0) {
            SKIP("high_fd", "RLIMIT_NOFILE cannot be raised above 150000 (hard limit %lu)", (unsigned long)rl.rlim_max);
            return;
        }
    }
    int targets[2] = {70000, 150000};
    for (int i = 0; i < 2; i++) {
        int h = targets[i];
        char c = 0;
        int ok = dup2(s, h) == h && write(h, "H", 1) == 1;
        struct pollfd pf = {h, POLLIN, 0};
        ok = ok && poll(&pf, 1, 2000) == 1 && (pf.revents & POLLIN) && read(h, &c, 1) == 1 && c == 'H';
        int ep = epoll_create1(0);
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = h}, got;
        ok = ok && epoll_ctl(ep, EPOLL_CTL_ADD, h, &ev) == 0 && write(h, "I", 1) == 1;
        ok = ok && epoll_wait(ep, &got, 1, 2000) == 1 && got.data.fd == h && read(h, &c, 1) == 1 && c == 'I';
        close(ep);
        ok = ok && close(h) == 0 && fcntl(h, F_GETFD) == -1;
        ok = ok && write(s, "J", 1) == 1 && read(s, &c, 1) == 1 && c == 'J';
        CHECK(i == 0 ? "high_fd_70000" : "high_fd_150000", ok, "fd %d", h);
    }
}

/* Many threads on one socket. */
#define WRITERS 8
#define RECORDS 1000
#define READERS 4
#define RECORD 64

static int threads_sock;
static pthread_mutex_t write_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t read_lock = PTHREAD_MUTEX_INITIALIZER;
static int records_read, bad_records, per_writer[WRITERS], next_seq[WRITERS];
static long bytes_read;

static void make_record(char *r, int writer, int seq) {
    memcpy(r, &writer, 4);
    memcpy(r + 4, &seq, 4);
    for (int i = 8; i < RECORD; i++) r[i] = (char)(writer * 31 + seq * 7 + i);
}

static void *record_writer(void *arg) {
    int writer = (int)(long)arg;
    char r[RECORD];
    for (int seq = 0; seq < RECORDS; seq++) {
        make_record(r, writer, seq);
        /* One whole record per write; the lock keeps records whole on
         * the kernel path too, where a write may wait for buffer space
         * part way through. */
        pthread_mutex_lock(&write_lock);
        ssize_t n = write(threads_sock, r, RECORD);
        pthread_mutex_unlock(&write_lock);
        if (n != RECORD) {
            __atomic_add_fetch(&bad_records, 1, __ATOMIC_RELAXED);
            break;
        }
    }
    return NULL;
}

static void *record_reader(void *arg) {
    (void)arg;
    char r[RECORD], want[RECORD];
    for (;;) {
        pthread_mutex_lock(&read_lock);
        if (records_read == WRITERS * RECORDS || bad_records) {
            pthread_mutex_unlock(&read_lock);
            return NULL;
        }
        ssize_t n = read_full(threads_sock, r, RECORD);
        int writer = -1, seq = -1;
        if (n == RECORD) {
            memcpy(&writer, r, 4);
            memcpy(&seq, r + 4, 4);
        }
        if (n != RECORD || writer < 0 || writer >= WRITERS || seq != next_seq[writer]) {
            bad_records++;
        } else {
            make_record(want, writer, seq);
            if (memcmp(r, want, RECORD) != 0) bad_records++;
            next_seq[writer]++;
            per_writer[writer]++;
            records_read++;
            bytes_read += n;
        }
        pthread_mutex_unlock(&read_lock);
    }
}

static void *one_byte_reader(void *arg) {
    char *c = arg;
    if (read(threads_sock, c, 1) != 1) *c = 0;
    return NULL;
}

static int join_within(pthread_t t, int seconds) {
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += seconds;
    return pthread_timedjoin_np(t, NULL, &deadline) == 0;
}

static void check_threads(int s) {
    threads_sock = s;
    pthread_t w[WRITERS], r[READERS];
    for (int i = 0; i < READERS; i++) pthread_create(&r[i], NULL, record_reader, NULL);
    for (int i = 0; i < WRITERS; i++) pthread_create(&w[i], NULL, record_writer, (void *)(long)i);
    int joined = 1;
    for (int i = 0; i < WRITERS; i++) joined &= join_within(w[i], 60);
    for (int i = 0; i < READERS; i++) joined &= join_within(r[i], 60);
    int counts = 1;
    for (int i = 0; i < WRITERS; i++) counts &= per_writer[i] == RECORDS;
    CHECK("threads_write_records", joined && !bad_records && counts && bytes_read == (long)WRITERS * RECORDS * RECORD, "joined %d bad %d read %ld bytes", joined, bad_records, bytes_read);

    /* Several threads blocked in read on one socket: each is woken. */
    char got[READERS + 1] = {0};
    for (int i = 0; i < READERS; i++) pthread_create(&r[i], NULL, one_byte_reader, &got[i]);
    usleep(100000);
    for (int i = 0; i < READERS; i++) write(s, "abcd" + i, 1);
    joined = 1;
    for (int i = 0; i < READERS; i++) joined &= join_within(r[i], 10);
    int seen[4] = {0};
    for (int i = 0; i < READERS; i++)
        if (got[i] >= 'a' && got[i] <= 'd') seen[got[i] - 'a']++;
    CHECK("threads_blocked_readers", joined && seen[0] == 1 && seen[1] == 1 && seen[2] == 1 && seen[3] == 1, "joined %d got %.4s", joined, got);
}

static void on_sigpipe(int sig) { (void)sig; sigpipes++; }

static void on_alarm(int sig) { (void)sig; }

/* Connects `s`, made and set up by the caller, to an 'E' server and reads
 * the status byte it sends (waiting for the connect if it is a non-blocking
 * one). */
static int connected(int s, struct sockaddr_in *sa) {
    int r = connect(s, (struct sockaddr *)sa, sizeof *sa);
    if (r != 0 && errno != EINPROGRESS) return 0;
    struct pollfd p = {s, POLLOUT, 0};
    if (poll(&p, 1, 5000) != 1) return 0;
    char status;
    write(s, "E", 1);
    p.events = POLLIN;
    return poll(&p, 1, 5000) == 1 && read(s, &status, 1) == 1;
}

/* Reads one byte from `s`, where nothing comes, for at most `usec`: a
 * timer's signal (a handler without SA_RESTART) ends a wait with EINTR
 * instead of hanging the check. Returns the read's errno (0 if it read). */
static int read_nothing_within(int s, long usec) {
    struct sigaction sa = {0}, old;
    sa.sa_handler = on_alarm;
    sigaction(SIGALRM, &sa, &old);
    struct itimerval soon = {{0, 0}, {usec / 1000000, usec % 1000000}}, off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &soon, NULL);
    char c;
    ssize_t r = read(s, &c, 1);
    int e = r == -1 ? errno : 0;
    setitimer(ITIMER_REAL, &off, NULL);
    sigaction(SIGALRM, &old, NULL);
    return e;
}

/* A read where nothing comes: EAGAIN at once on a non-blocking socket (one
 * taken for a blocking socket would wait, until the timer 3 s later). */
static int read_would_block(int s) {
    int e = read_nothing_within(s, 3000000);
    return e == EAGAIN || e == EWOULDBLOCK;
}

/* A read where nothing comes, on a blocking socket: it waits, until the
 * timer 0.3 s later. */
static int read_blocks(int s) {
    return read_nothing_within(s, 300000) == EINTR;
}

/* Options and modes set on a socket before its connect (through the
 * socket, a copy of it, or ioctl) are the connection's. */
static void check_options_before_connect(struct sockaddr_in *sa) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct timeval rto = {0, 200000};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &rto, sizeof rto);
    int up = connected(s, sa);
    /* A timeout not followed would wait: the alarm ends it (EINTR). */
    struct sigaction quiet = {0}, old;
    quiet.sa_handler = on_alarm;
    sigaction(SIGALRM, &quiet, &old);
    alarm(3);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    char c;
    ssize_t r = read(s, &c, 1);
    int e = errno;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    alarm(0);
    sigaction(SIGALRM, &old, NULL);
    double waited = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    CHECK("so_rcvtimeo_before_connect", up && r == -1 && e == EAGAIN && waited > 0.15 && waited < 2.0, "up %d read %zd after %.3f s", up, r, waited);
    close(s);

    s = socket(AF_INET, SOCK_STREAM, 0);
    fcntl(s, F_SETFL, fcntl(s, F_GETFL) | O_NONBLOCK);
    up = connected(s, sa);
    CHECK("fcntl_nonblock_before_connect", up && read_would_block(s), "up %d", up);
    close(s);

    s = socket(AF_INET, SOCK_STREAM, 0);
    int on = 1;
    ioctl(s, FIONBIO, &on);
    up = connected(s, sa);
    CHECK("fionbio_before_connect", up && read_would_block(s), "up %d", up);
    close(s);

    /* Set, then cleared again: the socket blocks. */
    s = socket(AF_INET, SOCK_STREAM, 0);
    int flags = fcntl(s, F_GETFL);
    fcntl(s, F_SETFL, flags | O_NONBLOCK);
    fcntl(s, F_SETFL, flags & ~O_NONBLOCK);
    up = connected(s, sa);
    CHECK("fcntl_nonblock_cleared_before_connect", up && read_blocks(s), "up %d", up);
    close(s);

    s = socket(AF_INET, SOCK_STREAM, 0);
    on = 1;
    ioctl(s, FIONBIO, &on);
    on = 0;
    ioctl(s, FIONBIO, &on);
    up = connected(s, sa);
    CHECK("fionbio_cleared_before_connect", up && read_blocks(s), "up %d", up);
    close(s);

    /* O_NONBLOCK set through a copy is the socket's (one open file). */
    s = socket(AF_INET, SOCK_STREAM, 0);
    int copy = dup(s);
    fcntl(copy, F_SETFL, O_NONBLOCK);
    close(copy);
    up = connected(s, sa);
    CHECK("nonblock_through_dup_before_connect", up && read_would_block(s), "up %d", up);
    close(s);

    s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    up = connected(s, sa);
    CHECK("sock_nonblock_connect", up && read_would_block(s), "up %d", up);
    close(s);
}

static int client(const char *ip, int port) {
    struct sockaddr_in sa = addr_of(ip, port);
    signal(SIGPIPE, on_sigpipe);

    /* Non-blocking connect, ppoll, SO_ERROR, names. */
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int r = connect(s, (struct sockaddr *)&sa, sizeof sa);
    CHECK("connect_nonblocking", r == 0 || errno == EINPROGRESS, "connect returned %d", r);
    struct pollfd p = {s, POLLOUT, 0};
    struct timespec ts = {5, 0};
    r = ppoll(&p, 1, &ts, NULL);
    CHECK("ppoll_writable_after_connect", r == 1 && (p.revents & POLLOUT), "ppoll %d revents %x", r, p.revents);
    int err = -1;
    socklen_t len = sizeof err;
    CHECK("so_error", getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0, "SO_ERROR %d", err);
    struct sockaddr_in peer, me;
    len = sizeof peer;
    CHECK("getpeername", getpeername(s, (struct sockaddr *)&peer, &len) == 0 && peer.sin_addr.s_addr == sa.sin_addr.s_addr && peer.sin_port == sa.sin_port, "peer mismatch");
    len = sizeof me;
    CHECK("getsockname", getsockname(s, (struct sockaddr *)&me, &len) == 0 && me.sin_port != 0 && me.sin_addr.s_addr != 0, "local %x:%d", me.sin_addr.s_addr, ntohs(me.sin_port));
    int type = 0;
    len = sizeof type;
    CHECK("so_type", getsockopt(s, SOL_SOCKET, SO_TYPE, &type, &len) == 0 && type == SOCK_STREAM, "type %d", type);
    int one = 1, v = 0;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(s, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    len = sizeof v;
    getsockopt(s, IPPROTO_TCP, TCP_NODELAY, &v, &len);
    CHECK("tcp_nodelay", v == 1, "TCP_NODELAY %d", v);
    v = 0;
    getsockopt(s, SOL_SOCKET, SO_KEEPALIVE, &v, &len);
    CHECK("so_keepalive", v == 1, "SO_KEEPALIVE %d", v);
    int rcvbuf = 1 << 16;
    setsockopt(s, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    v = 0;
    getsockopt(s, SOL_SOCKET, SO_RCVBUF, &v, &len);
    CHECK("so_rcvbuf", v >= (1 << 16), "SO_RCVBUF %d", v);

    /* Echo through every read/write family. */
    char c = 'E';
    fcntl(s, F_SETFL, fcntl(s, F_GETFL) & ~O_NONBLOCK);
    write(s, &c, 1);
    char status = 0;
    CHECK("accept4_flags", read(s, &status, 1) == 1 && status == 3, "accepted fd flags %d", status);
    char out[100], in[100];
    for (int i = 0; i < 100; i++) out[i] = (char)i;
    struct iovec wv[2] = {{out, 30}, {out + 30, 70}};
    CHECK("writev", writev(s, wv, 2) == 100, "writev");
    char a[40], b[60];
    struct iovec rv[2] = {{a, 40}, {b, 60}};
    usleep(50000);
    ssize_t n = readv(s, rv, 2);
    CHECK("readv", n == 100 && memcmp(a, out, 40) == 0 && memcmp(b, out + 40, 60) == 0, "readv %zd", n);
    CHECK("send", send(s, out, 100, MSG_NOSIGNAL) == 100, "send");
    usleep(50000);
    int avail = 0;
    CHECK("fionread", ioctl(s, FIONREAD, &avail) == 0 && avail == 100, "FIONREAD %d", avail);
    CHECK("recv_peek", recv(s, in, 10, MSG_PEEK) == 10 && memcmp(in, out, 10) == 0, "peek");
    CHECK("recv_waitall", recv(s, in, 100, MSG_WAITALL) == 100 && memcmp(in, out, 100) == 0, "recv");
    CHECK("sendto", sendto(s, out, 100, 0, NULL, 0) == 100, "sendto");
    socklen_t flen = sizeof peer;
    CHECK("recvfrom", recvfrom(s, in, 100, MSG_WAITALL, (struct sockaddr *)&peer, &flen) == 100 && memcmp(in, out, 100) == 0, "recvfrom");
    struct msghdr m = {0};
    struct iovec mv = {out, 100};
    m.msg_iov = &mv;
    m.msg_iovlen = 1;
    CHECK("sendmsg", sendmsg(s, &m, 0) == 100, "sendmsg");
    struct iovec iv = {in, 100};
    struct msghdr rm = {0};
    rm.msg_iov = &iv;
    rm.msg_iovlen = 1;
    CHECK("recvmsg", recvmsg(s, &rm, MSG_WAITALL) == 100 && memcmp(in, out, 100) == 0, "recvmsg");
    CHECK("recv_dontwait_empty", recv(s, in, 1, MSG_DONTWAIT) == -1 && errno == EAGAIN, "expected EAGAIN");
    fcntl(s, F_SETFL, O_NONBLOCK);
    CHECK("fcntl_nonblock", read(s, in, 1) == -1 && errno == EAGAIN, "expected EAGAIN");
    int off = 0;
    ioctl(s, FIONBIO, &off);
    struct timeval rto = {0, 200000};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &rto, sizeof rto);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    r = read(s, in, 1);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double waited = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    CHECK("so_rcvtimeo", r == -1 && errno == EAGAIN && waited > 0.15 && waited < 2.0, "read %d after %.3f s", r, waited);
    struct timeval none = {0, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof none);
    /* SO_RCVTIMEO bounds a blocking accept too. */
    int idle = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in any_port = {0};
    any_port.sin_family = AF_INET;
    any_port.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(idle, (struct sockaddr *)&any_port, sizeof any_port);
    listen(idle, 4);
    setsockopt(idle, SOL_SOCKET, SO_RCVTIMEO, &rto, sizeof rto);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    r = accept(idle, NULL, NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    waited = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    CHECK("so_rcvtimeo_accept", r == -1 && errno == EAGAIN && waited > 0.15 && waited < 2.0, "accept %d after %.3f s", r, waited);
    close(idle);

    /* Readiness: select, pselect, poll, epoll (level, edge, oneshot). */
    fd_set rs;
    FD_ZERO(&rs);
    FD_SET(s, &rs);
    struct timeval tv = {0, 100000};
    CHECK("select_timeout", select(s + 1, &rs, NULL, NULL, &tv) == 0, "select saw data");
    write(s, "x", 1);
    FD_ZERO(&rs);
    FD_SET(s, &rs);
    struct timespec pts = {5, 0};
    CHECK("pselect_readable", pselect(s + 1, &rs, NULL, NULL, &pts, NULL) == 1 && FD_ISSET(s, &rs), "pselect");
    struct pollfd pf = {s, POLLIN | POLLOUT, 0};
    CHECK("poll_readable_writable", poll(&pf, 1, 1000) == 1 && (pf.revents & (POLLIN | POLLOUT)) == (POLLIN | POLLOUT), "revents %x", pf.revents);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 0x1234};
    epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev);
    struct epoll_event got[4];
    CHECK("epoll_level", epoll_wait(ep, got, 4, 1000) == 1 && got[0].data.u64 == 0x1234 && epoll_wait(ep, got, 4, 100) == 1, "level-triggered twice");
    read(s, in, 1);
    CHECK("epoll_level_drained", epoll_wait(ep, got, 4, 100) == 0, "nothing left");
    ev.events = EPOLLIN | EPOLLET;
    epoll_ctl(ep, EPOLL_CTL_MOD, s, &ev);
    write(s, "y", 1);
    int first = epoll_wait(ep, got, 4, 1000);
    int second = epoll_wait(ep, got, 4, 100);
    CHECK("epoll_edge", first == 1 && second == 0, "edge: %d then %d", first, second);
    write(s, "z", 1);
    CHECK("epoll_edge_new_data", epoll_wait(ep, got, 4, 1000) == 1, "new edge");
    read_full(s, in, 2);
    ev.events = EPOLLIN | EPOLLONESHOT;
    epoll_ctl(ep, EPOLL_CTL_MOD, s, &ev);
    write(s, "1", 1);
    first = epoll_wait(ep, got, 4, 1000);
    write(s, "2", 1);
    second = epoll_wait(ep, got, 4, 100);
    epoll_ctl(ep, EPOLL_CTL_MOD, s, &ev);
    int third = epoll_wait(ep, got, 4, 1000);
    CHECK("epoll_oneshot", first == 1 && second == 0 && third == 1, "oneshot: %d %d %d", first, second, third);
    read_full(s, in, 2);
    sigset_t mask;
    sigemptyset(&mask);
    ev.events = EPOLLOUT;
    epoll_ctl(ep, EPOLL_CTL_MOD, s, &ev);
    CHECK("epoll_pwait_writable", epoll_pwait(ep, got, 4, 1000, &mask) == 1 && (got[0].events & EPOLLOUT), "epoll_pwait");
    struct timespec two = {1, 0};
    CHECK("epoll_pwait2", epoll_pwait2(ep, got, 4, &two, NULL) == 1 && (got[0].events & EPOLLOUT), "epoll_pwait2");
    epoll_ctl(ep, EPOLL_CTL_DEL, s, NULL);
    CHECK("epoll_del", epoll_wait(ep, got, 4, 50) == 0, "deleted fd reported");

    /* The fortified variants (a length the compiler cannot check). */
    volatile size_t one_byte = 1;
    volatile nfds_t one_fd = 1;
    write(s, "abc", 3);
    struct pollfd fp = {s, POLLIN, 0};
    CHECK("poll_chk", poll(&fp, one_fd, 1000) == 1, "__poll_chk");
    CHECK("read_chk", read(s, in, one_byte) == 1 && in[0] == 'a', "__read_chk");
    CHECK("recv_chk", recv(s, in, one_byte, 0) == 1 && in[0] == 'b', "__recv_chk");
    CHECK("recvfrom_chk", recvfrom(s, in, one_byte, 0, NULL, NULL) == 1 && in[0] == 'c', "__recvfrom_chk");

    /* sendfile from a file, with and without an offset. */
    char path[] = "/tmp/calls-sendfile-XXXXXX";
    int file = mkstemp(path);
    unlink(path);
    char content[5000];
    for (int i = 0; i < 5000; i++) content[i] = (char)('A' + i % 26);
    write(file, content, sizeof content);
    off_t at = 100;
    ssize_t sf = sendfile(s, file, &at, 3000);
    char echo[5000];
    CHECK("sendfile_offset", sf == 3000 && at == 3100 && recv(s, echo, 3000, MSG_WAITALL) == 3000 && memcmp(echo, content + 100, 3000) == 0, "sendfile %zd at %ld", sf, (long)at);
    lseek(file, 4000, SEEK_SET);
    sf = sendfile(s, file, NULL, 2000);
    CHECK("sendfile_file_position", sf == 1000 && lseek(file, 0, SEEK_CUR) == 5000 && recv(s, echo, 1000, MSG_WAITALL) == 1000 && memcmp(echo, content + 4000, 1000) == 0, "sendfile %zd", sf);
    close(file);

    /* dup, dup2, dup3: new descriptors name the same connection. */
    int d = dup(s);
    CHECK("dup", d >= 0 && write(d, "d", 1) == 1 && read(s, in, 1) == 1 && in[0] == 'd', "dup");
    close(d);
    CHECK("close_dup_keeps_connection", write(s, "e", 1) == 1 && read(s, in, 1) == 1 && in[0] == 'e', "closing a dup ended it");
    int spare[2];
    pipe(spare);
    CHECK("dup2_over_other_fd", dup2(s, spare[0]) == spare[0] && write(spare[0], "f", 1) == 1 && read(s, in, 1) == 1 && in[0] == 'f', "dup2");
    CHECK("dup3", dup3(s, spare[1], O_CLOEXEC) == spare[1] && (fcntl(spare[1], F_GETFD) & FD_CLOEXEC) && write(spare[1], "g", 1) == 1 && read(spare[0], in, 1) == 1 && in[0] == 'g', "dup3");
    close(spare[0]);
    close(spare[1]);
    int high = fcntl(s, F_DUPFD, 600);
    CHECK("fcntl_dupfd", high >= 600 && write(high, "i", 1) == 1 && read(s, in, 1) == 1 && in[0] == 'i', "F_DUPFD");
    CHECK("close_range", high >= 600 && close_range(high, high + 10, 0) == 0 && fcntl(high, F_GETFD) == -1, "close_range");
    CHECK("connection_survives_dups", write(s, "h", 1) == 1 && read(s, in, 1) == 1 && in[0] == 'h', "after closing dups");
    shutdown(s, SHUT_WR);
    CHECK("eof_after_shutdown_wr", read(s, in, 1) == 0, "server should close after our FIN");
    close(s);

    /* Half-close from the server: EOF while we may still write; RDHUP. */
    s = connect_to(&sa, 'H');
    ev.events = EPOLLRDHUP;
    epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev);
    CHECK("epoll_rdhup", epoll_wait(ep, got, 4, 2000) == 1 && (got[0].events & EPOLLRDHUP), "no RDHUP");
    CHECK("half_close_data_then_eof", read_full(s, in, 3) == 3 && memcmp(in, "bye", 3) == 0 && read(s, in, 1) == 0, "bye, EOF");
    CHECK("write_after_peer_half_close", write(s, out, 100) == 100, "peer still reads");
    shutdown(s, SHUT_WR);
    close(s);
    close(ep);

    /* The server closes: EOF, then one write accepted, then EPIPE and SIGPIPE. */
    s = connect_to(&sa, 'C');
    usleep(100000);
    struct pollfd cp = {s, POLLIN | POLLOUT, 0};
    r = poll(&cp, 1, 1000);
    CHECK("poll_after_peer_close", r == 1 && (cp.revents & (POLLIN | POLLOUT)) == (POLLIN | POLLOUT) && !(cp.revents & (POLLERR | POLLHUP)), "revents %x", cp.revents);
    CHECK("eof_on_peer_close", read(s, in, 1) == 0, "expected EOF");
    send(s, out, 10, MSG_NOSIGNAL);
    usleep(10000);
    CHECK("epipe_nosignal", send(s, out, 10, MSG_NOSIGNAL) == -1 && errno == EPIPE && sigpipes == 0, "expected EPIPE without SIGPIPE");
    CHECK("sigpipe", write(s, out, 10) == -1 && errno == EPIPE && sigpipes == 1, "sigpipes %d", (int)sigpipes);
    close(s);

    /* The server closes with our bytes unread: a reset. */
    s = connect_to(&sa, 'R');
    write(s, out, 100);
    CHECK("econnreset", read(s, in, 1) == -1 && errno == ECONNRESET, "expected ECONNRESET");
    close(s);

    /* A reset is reported once, to whichever call comes first: a write
     * gives ECONNRESET, the next one EPIPE, and a read then end of stream. */
    s = connect_to(&sa, 'R');
    write(s, out, 100);
    usleep(500000);
    ssize_t w1 = send(s, out, 10, MSG_NOSIGNAL);
    int e1 = errno;
    ssize_t w2 = send(s, out, 10, MSG_NOSIGNAL);
    int e2 = errno;
    ssize_t r3 = read(s, in, 1);
    CHECK("write_after_reset", w1 == -1 && e1 == ECONNRESET && w2 == -1 && e2 == EPIPE && r3 == 0, "writes %zd (%d) %zd (%d), read %zd", w1, e1, w2, e2, r3);
    close(s);

    /* A readiness the program makes itself (SHUT_RD) is reported by the
       same wait as another connection's, even once the set judges the
       connection only when its peer changes something. */
    int ended = connect_to(&sa, 'C');
    int shut = connect_to(&sa, 'E');
    char st;
    int eps = epoll_create1(0);
    struct epoll_event eev = {.events = EPOLLIN, .data.u64 = 1}, sev = {.events = EPOLLIN, .data.u64 = 2}, sgot[4];
    int added = read(shut, &st, 1) == 1 && epoll_ctl(eps, EPOLL_CTL_ADD, ended, &eev) == 0 && epoll_ctl(eps, EPOLL_CTL_ADD, shut, &sev) == 0;
    int first_ready = epoll_wait(eps, sgot, 4, 2000);
    first_ready = first_ready == 1 && sgot[0].data.u64 == 1 && epoll_wait(eps, sgot, 4, 0) == 1;
    shutdown(shut, SHUT_RD);
    int both = epoll_wait(eps, sgot, 4, 0);
    CHECK("epoll_shutdown_rd_with_others", added && first_ready && both == 2 && sgot[0].data.u64 + sgot[1].data.u64 == 3, "added %d, one ready %d, then %d events", added, first_ready, both);
    close(eps);
    close(shut);
    close(ended);

    /* MSG_WAITALL across paced writes; shutdown(SHUT_RD). */
    s = connect_to(&sa, 'W');
    char big[10000];
    /* MSG_PEEK with MSG_WAITALL waits for all of it too, and takes none. */
    ssize_t peeked = recv(s, big, 3000, MSG_PEEK | MSG_WAITALL);
    CHECK("peek_waitall_paced", peeked == 3000, "peeked %zd", peeked);
    CHECK("waitall_paced", recv(s, big, sizeof big, MSG_WAITALL) == (ssize_t)sizeof big, "short read");
    shutdown(s, SHUT_RD);
    CHECK("shutdown_rd", read(s, in, 1) == 0, "read after SHUT_RD");
    write(s, "k", 1);
    close(s);

    /* SO_LINGER {1, 0}: the server's close resets the connection. */
    s = connect_to(&sa, 'L');
    CHECK("so_linger_zero_resets", read(s, in, 1) == -1 && errno == ECONNRESET, "expected ECONNRESET");
    close(s);

    /* MSG_MORE, TCP_CORK, mmsg, splice, epoll sets, high descriptors. */
    s = connect_to(&sa, 'E');
    read(s, &status, 1);
    check_cork(s);
    check_mmsg(s);
    check_splice(s);
    check_epoll_sets(s);
    check_high_fds(s);
    close(s);

    s = connect_to(&sa, 'E');
    read(s, &status, 1);
    check_threads(s);
    close(s);

    {
        /* An accepted socket has its listener's options, as Linux copies them. */
        int q = connect_to(&sa, 'I');
        char report[64] = {0};
        ssize_t got = read_full(q, report, sizeof report - 1);
        report[got > 0 ? got : 0] = 0;
        CHECK("accept_inherits_listener_options", strcmp(report, "k=1 n=1 t=30 l=1/3") == 0, "accepted socket: %s", report);
        close(q);
    }

    check_options_before_connect(&sa);

    printf("%d failed\n", failures);
    return failures ? 1 : 0;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: calls server|client ADDR PORT\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    return strcmp(argv[1], "server") == 0 ? server(argv[2], atoi(argv[3])) : client(argv[2], atoi(argv[3]));
}
