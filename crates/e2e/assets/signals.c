/*
 * signals: blocking socket calls interrupted by signals, and sockets that
 * outlive exec, one named check each.
 *
 *   signals server ADDR PORT
 *   signals client ADDR PORT        prints "ok NAME" / "FAIL NAME: why"
 *
 * Each check opens a connection whose first byte tells the server what to
 * do. Run over the kernel path first, every check is known to describe
 * Linux.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

static int failures;
static volatile sig_atomic_t alarms;

#define CHECK(name, cond, ...)                                   \
    do {                                                         \
        if (cond) {                                              \
            printf("ok %s\n", name);                             \
        } else {                                                 \
            printf("FAIL %s: ", name);                           \
            printf(__VA_ARGS__);                                 \
            printf(" (errno %d %s)\n", errno, strerror(errno));  \
            failures++;                                          \
        }                                                        \
        fflush(stdout);                                          \
    } while (0)

static struct sockaddr_in addr_of(const char *ip, int port) {
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(port);
    inet_pton(AF_INET, ip, &sa.sin_addr);
    return sa;
}

/* ---- server ------------------------------------------------------------ */

/* What the last 'X' connection's peer saw: "eof", "data" or "timeout". */
static char exec_report[16] = "none";

static void serve_one(int c) {
    char cmd, buf[4096];
    if (read(c, &cmd, 1) != 1) { close(c); return; }
    switch (cmd) {
    case 'L': /* answer late: "late" after 400 ms, then wait for EOF */
        usleep(400000);
        write(c, "late", 4);
        while (read(c, buf, sizeof buf) > 0) {}
        break;
    case 'X': { /* the client will exec: report what this end sees */
        write(c, "x", 1);
        struct pollfd p = {c, POLLIN, 0};
        int r = poll(&p, 1, 10000);
        ssize_t n = r == 1 ? read(c, buf, sizeof buf) : -1;
        strcpy(exec_report, r == 0 ? "timeout" : n == 0 ? "eof" : n < 0 ? "error" : "data");
        break;
    }
    case 'Q': /* what did the last 'X' connection's end see? */
        write(c, exec_report, strlen(exec_report));
        break;
    }
    close(c);
}

static int server(const char *ip, int port) {
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = addr_of(ip, port);
    if (bind(l, (struct sockaddr *)&sa, sizeof sa) || listen(l, 16)) { perror("listen"); return 1; }
    for (;;) {
        int c = accept(l, NULL, NULL);
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

static void on_alarm(int sig) { (void)sig; alarms++; }
static void on_alarm_info(int sig, siginfo_t *info, void *ctx) {
    (void)ctx;
    if (sig == SIGALRM && info && info->si_signo == SIGALRM) alarms++;
}

static void on_usr1(int sig) { (void)sig; }

/* A thread blocked in read on a socket, and what its reads returned. */
struct blocked {
    int fd;
    ssize_t first, second;
    int first_errno;
};

static void *blocked_reader(void *arg) {
    struct blocked *b = arg;
    char c;
    b->first = read(b->fd, &c, 1);
    b->first_errno = errno;
    b->second = read(b->fd, &c, 1);
    return NULL;
}

/* One SIGALRM in 100 ms. */
static void alarm_soon(void) {
    struct itimerval it = {{0, 0}, {0, 100000}};
    setitimer(ITIMER_REAL, &it, NULL);
}

static void install(int flags, int siginfo) {
    struct sigaction sa = {0};
    if (siginfo) sa.sa_sigaction = on_alarm_info; else sa.sa_handler = on_alarm;
    sa.sa_flags = flags | (siginfo ? SA_SIGINFO : 0);
    sigemptyset(&sa.sa_mask);
    sigaction(SIGALRM, &sa, NULL);
}

/* A blocking read of the server's late answer, with an alarm in between. */
static ssize_t late_read(struct sockaddr_in *sa, char *buf) {
    int s = connect_to(sa, 'L');
    alarms = 0;
    alarm_soon();
    ssize_t n = read(s, buf, 4);
    int e = errno;
    close(s);
    errno = e;
    return n;
}

static int client(const char *ip, int port, const char *self) {
    struct sockaddr_in sa = addr_of(ip, port);
    char buf[16];
    ssize_t n;

    install(0, 0);
    n = late_read(&sa, buf);
    CHECK("eintr_without_sa_restart", n == -1 && errno == EINTR && alarms == 1, "read %zd, %d alarms", n, (int)alarms);

    install(SA_RESTART, 0);
    n = late_read(&sa, buf);
    CHECK("sa_restart_read", n == 4 && memcmp(buf, "late", 4) == 0 && alarms == 1, "read %zd, %d alarms", n, (int)alarms);

    install(SA_RESTART, 1);
    n = late_read(&sa, buf);
    CHECK("sa_restart_siginfo_handler", n == 4 && alarms == 1, "read %zd, %d alarms", n, (int)alarms);

    /* With a receive timeout, Linux fails with EINTR even under SA_RESTART. */
    install(SA_RESTART, 0);
    int s = connect_to(&sa, 'L');
    struct timeval tv = {5, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    alarms = 0;
    alarm_soon();
    n = read(s, buf, 4);
    CHECK("sa_restart_with_rcvtimeo_gives_eintr", n == -1 && errno == EINTR, "read %zd", n);
    close(s);

    /* signal() has BSD semantics in glibc: restart. */
    signal(SIGALRM, on_alarm);
    n = late_read(&sa, buf);
    CHECK("signal_restarts", n == 4 && alarms == 1, "read %zd, %d alarms", n, (int)alarms);

    /* The program sees its own handler and flags, not the library's. */
    install(SA_RESTART, 0);
    struct sigaction cur;
    sigaction(SIGALRM, NULL, &cur);
    CHECK("sigaction_reports_the_program_s_handler", cur.sa_handler == on_alarm && (cur.sa_flags & SA_RESTART) && !(cur.sa_flags & SA_SIGINFO), "handler %p flags %x", (void *)cur.sa_handler, cur.sa_flags);
    void (*prev)(int) = signal(SIGALRM, SIG_IGN);
    CHECK("signal_returns_the_previous_handler", prev == on_alarm, "previous %p", (void *)prev);

    /* SA_RESETHAND: one delivery, then the default again. */
    install(SA_RESTART | SA_RESETHAND, 0);
    n = late_read(&sa, buf);
    sigaction(SIGALRM, NULL, &cur);
    CHECK("sa_resethand", n == 4 && alarms == 1 && cur.sa_handler == SIG_DFL, "read %zd, handler %p", n, (void *)cur.sa_handler);

    /* A blocking accept restarts too (the connection comes from a child). */
    install(SA_RESTART, 0);
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in lo = addr_of("127.0.0.1", port + 1);
    if (bind(l, (struct sockaddr *)&lo, sizeof lo) || listen(l, 4)) { perror("listen"); return 2; }
    pid_t child = fork();
    if (child == 0) {
        usleep(400000);
        int c = socket(AF_INET, SOCK_STREAM, 0);
        connect(c, (struct sockaddr *)&lo, sizeof lo);
        write(c, "k", 1);
        close(c);
        _exit(0);
    }
    alarms = 0;
    alarm_soon();
    int a = accept(l, NULL, NULL);
    CHECK("sa_restart_accept", a >= 0 && alarms == 1 && read(a, buf, 1) == 1 && buf[0] == 'k', "accept %d, %d alarms", a, (int)alarms);
    waitpid(child, NULL, 0);
    close(a);
    close(l);

    /* The JDK's way to close a socket another thread is blocked on: dup2 a
     * dead socket over it, then signal the thread. The reader gets EINTR,
     * then reads the dead socket (end of stream); the peer sees the end of
     * the stream because the connection's last descriptor is gone. */
    struct sigaction usr1 = {0};
    usr1.sa_handler = on_usr1;
    sigemptyset(&usr1.sa_mask);
    sigaction(SIGUSR1, &usr1, NULL);
    s = connect_to(&sa, 'X');
    if (read(s, buf, 1) != 1) { perror("read"); return 2; }
    struct blocked b = {s, 0, 0, 0};
    pthread_t reader;
    pthread_create(&reader, NULL, blocked_reader, &b);
    usleep(200000);
    int dead[2];
    socketpair(AF_UNIX, SOCK_STREAM, 0, dead);
    shutdown(dead[0], SHUT_RDWR);
    dup2(dead[0], s);
    close(dead[0]);
    close(dead[1]);
    pthread_kill(reader, SIGUSR1);
    pthread_join(reader, NULL);
    int q = connect_to(&sa, 'Q');
    n = read(q, buf, sizeof buf - 1);
    buf[n > 0 ? n : 0] = 0;
    close(q);
    CHECK("jdk_dup2_wakes_a_blocked_reader", b.first == -1 && b.first_errno == EINTR && b.second == 0 && strcmp(buf, "eof") == 0, "reads %zd (%s) then %zd; the peer saw %s", b.first, strerror(b.first_errno), b.second, buf);
    close(s);

    /* exec: the connection survives it; the exec'd program reports what
     * it and the peer see. */
    s = connect_to(&sa, 'X');
    if (read(s, buf, 1) != 1) { perror("read"); return 2; }
    char fd[16], portstr[16];
    snprintf(fd, sizeof fd, "%d", s);
    snprintf(portstr, sizeof portstr, "%d", port);
    fflush(stdout);
    execl(self, self, "after-exec", ip, portstr, fd, (char *)NULL);
    perror("exec");
    return 2;
}

/* The program exec'd with a connected socket on `fd`. The connection
 * survives exec, on Linux TCP and over vSocket: what it writes reaches the
 * peer. Prints exec_state=works or exec_state=unconnected. */
static int after_exec(const char *ip, int port, int fd) {
    char buf[16];
    struct sockaddr_in sa = addr_of(ip, port);
    ssize_t w = write(fd, "after exec", 10);
    int we = errno;
    int q = connect_to(&sa, 'Q');
    ssize_t n = read(q, buf, sizeof buf - 1);
    buf[n > 0 ? n : 0] = 0;
    close(q);
    CHECK("exec_connection_keeps_working", w == 10 && strcmp(buf, "data") == 0, "write %zd (%s); the peer saw %s", w, w == 10 ? "ok" : strerror(we), buf);
    printf("exec_state=%s\n", w == 10 ? "works" : "unconnected");
    close(fd);
    printf("%d failed\n", failures);
    return failures ? 1 : 0;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: signals server|client ADDR PORT\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    if (strcmp(argv[1], "server") == 0) return server(argv[2], atoi(argv[3]));
    if (strcmp(argv[1], "after-exec") == 0 && argc > 4) return after_exec(argv[2], atoi(argv[3]), atoi(argv[4]));
    int r = client(argv[2], atoi(argv[3]), argv[0]);
    return r ? r : failures ? 1 : 0;
}
