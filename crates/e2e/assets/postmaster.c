/*
 * postmaster: the accept loop of PostgreSQL's postmaster, reduced to its
 * system calls.
 *
 *   postmaster ADDR PORT NOFILE HOLD_MS
 *
 * A blocking listening socket; every signal blocked except around select;
 * a SIGCHLD handler without SA_RESTART; a fork per accepted connection,
 * the child closing the listening socket, answering "pong\n" to the
 * client's line and exiting after HOLD_MS. Unlike PostgreSQL, the parent
 * keeps its copy of each connection until that child is reaped, so that
 * with RLIMIT_NOFILE set to NOFILE a burst of clients runs the parent out
 * of descriptors: accept then fails with EMFILE (or ENFILE), the server
 * says so and tries again once children have exited, as servers do. The
 * connections the kernel (or vSocket) holds meanwhile must all be served.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_CHILDREN 1024

static struct {
    pid_t pid;
    int fd;
} children[MAX_CHILDREN];
static volatile sig_atomic_t child_exited;

static void on_sigchld(int sig) {
    (void)sig;
    child_exited = 1;
}

static void reap(void) {
    pid_t pid;
    int status;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (int i = 0; i < MAX_CHILDREN; i++) {
            if (children[i].pid == pid) {
                close(children[i].fd);
                children[i].pid = 0;
                break;
            }
        }
    }
}

static void serve(int conn, int hold_ms) {
    char line[64];
    ssize_t n = read(conn, line, sizeof line);
    if (n > 0 && write(conn, "pong\n", 5) != 5)
        _exit(1);
    struct timespec hold = {hold_ms / 1000, (long)(hold_ms % 1000) * 1000000L};
    nanosleep(&hold, NULL);
    _exit(0);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: postmaster ADDR PORT NOFILE HOLD_MS\n");
        return 2;
    }
    int hold_ms = atoi(argv[4]);
    struct rlimit nofile = {(rlim_t)atol(argv[3]), (rlim_t)atol(argv[3])};
    if (setrlimit(RLIMIT_NOFILE, &nofile) < 0) {
        perror("setrlimit");
        return 1;
    }
    sigset_t block_all, unblocked;
    sigfillset(&block_all);
    sigemptyset(&unblocked);
    sigprocmask(SIG_SETMASK, &block_all, NULL);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigchld;
    sa.sa_mask = block_all;
    sa.sa_flags = SA_NOCLDSTOP; /* no SA_RESTART, as the postmaster's */
    sigaction(SIGCHLD, &sa, NULL);

    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &addr.sin_addr);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 128) < 0) {
        perror("bind/listen");
        return 1;
    }
    fprintf(stderr, "listening\n");
    unsigned long accepted = 0, refused = 0;
    for (;;) {
        fd_set rmask;
        FD_ZERO(&rmask);
        FD_SET(lfd, &rmask);
        struct timeval timeout = {60, 0};
        sigprocmask(SIG_SETMASK, &unblocked, NULL);
        int selres = select(lfd + 1, &rmask, NULL, NULL, &timeout);
        sigprocmask(SIG_SETMASK, &block_all, NULL);
        if (selres < 0 && errno != EINTR) {
            perror("select");
            return 1;
        }
        if (child_exited) {
            child_exited = 0;
            reap();
        }
        if (selres > 0 && FD_ISSET(lfd, &rmask)) {
            int conn = accept(lfd, NULL, NULL);
            if (conn < 0) {
                if (errno == EMFILE || errno == ENFILE) {
                    /* Out of descriptors: wait for a child to go. */
                    if (refused++ % 100 == 0)
                        fprintf(stderr, "accept: %s (%lu served)\n", strerror(errno), accepted);
                    struct timespec pause = {0, 5000000L};
                    nanosleep(&pause, NULL);
                    reap();
                    continue;
                }
                perror("accept");
                continue;
            }
            int slot = -1;
            for (int i = 0; i < MAX_CHILDREN && slot < 0; i++)
                if (children[i].pid == 0)
                    slot = i;
            pid_t pid = fork();
            if (pid == 0) {
                close(lfd);
                for (int i = 0; i < MAX_CHILDREN; i++)
                    if (children[i].pid != 0)
                        close(children[i].fd);
                serve(conn, hold_ms);
            }
            if (pid < 0 || slot < 0) {
                close(conn);
                continue;
            }
            children[slot].pid = pid;
            children[slot].fd = conn;
            accepted++;
        }
    }
}
