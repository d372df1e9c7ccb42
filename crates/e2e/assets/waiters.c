/*
 * waiters: four waiters on one connection, and how late each wakes.
 *
 * For ROUNDS connections (to a listener of its own on 127.0.0.1:PORT), four
 * waiters wait on the client's socket: two threads blocked in recv, a thread
 * in epoll_wait (edge-triggered) and a forked child in poll for POLLRDHUP.
 * The other end first sends one byte (one reader takes it; every waiter may
 * wake for it, and the others sleep again), then, 30 ms later, ends the
 * stream. Each waiter notes when it woke for the end. Prints the largest and
 * the median delay over all waiters and rounds:
 *
 *   waiters PORT ROUNDS     prints "worst=WAITER@roundR max_us=N median_us=M"
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static int conn_fd;

static void *reader(void *out) {
    char b;
    for (;;) {
        ssize_t n = recv(conn_fd, &b, 1, 0);
        if (n == 1)
            continue;
        if (n == 0)
            break;
        if (errno != EINTR)
            die("recv");
    }
    *(int64_t *)out = now_us();
    return NULL;
}

static void *epoller(void *out) {
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | EPOLLET, .data.fd = conn_fd};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, conn_fd, &ev) < 0)
        die("epoll");
    for (;;) {
        int n = epoll_wait(ep, &ev, 1, -1);
        if (n == 1 && (ev.events & (EPOLLRDHUP | EPOLLHUP)))
            break;
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
    }
    *(int64_t *)out = now_us();
    close(ep);
    return NULL;
}

static int cmp(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: waiters PORT ROUNDS\n");
        return 2;
    }
    int rounds = atoi(argv[2]);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int l = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(l, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(l, 16) < 0)
        die("listen");
    int64_t *delays = calloc((size_t)rounds * 4, sizeof *delays);
    for (int r = 0; r < rounds; r++) {
        conn_fd = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(conn_fd, (struct sockaddr *)&sa, sizeof sa) < 0)
            die("connect");
        int s = accept(l, NULL, NULL);
        if (s < 0)
            die("accept");
        int times[2];
        if (pipe(times) < 0)
            die("pipe");
        pid_t child = fork();
        if (child == 0) {
            close(s);
            struct pollfd p = {.fd = conn_fd, .events = POLLRDHUP};
            for (;;) {
                int n = poll(&p, 1, -1);
                if (n == 1 && (p.revents & (POLLRDHUP | POLLHUP)))
                    break;
                if (n < 0 && errno != EINTR)
                    die("poll");
            }
            int64_t t = now_us();
            if (write(times[1], &t, sizeof t) != sizeof t)
                die("write");
            _exit(0);
        }
        int64_t woke[4] = {0};
        pthread_t th[3];
        pthread_create(&th[0], NULL, reader, &woke[0]);
        pthread_create(&th[1], NULL, reader, &woke[1]);
        pthread_create(&th[2], NULL, epoller, &woke[2]);
        usleep(30000);
        if (send(s, "x", 1, 0) != 1)
            die("send");
        usleep(30000);
        int64_t end = now_us();
        shutdown(s, SHUT_WR);
        for (int i = 0; i < 3; i++)
            pthread_join(th[i], NULL);
        if (read(times[0], &woke[3], sizeof woke[3]) != sizeof woke[3])
            die("read");
        waitpid(child, NULL, 0);
        for (int i = 0; i < 4; i++)
            delays[r * 4 + i] = woke[i] - end;
        close(times[0]);
        close(times[1]);
        close(s);
        close(conn_fd);
    }
    static const char *names[4] = {"recv", "recv", "epoll", "poll-in-child"};
    int n = rounds * 4, worst = 0;
    for (int i = 1; i < n; i++)
        if (delays[i] > delays[worst])
            worst = i;
    printf("worst=%s@round%d ", names[worst % 4], worst / 4);
    qsort(delays, (size_t)n, sizeof *delays, cmp);
    printf("max_us=%lld median_us=%lld\n", (long long)delays[n - 1], (long long)delays[n / 2]);
    return 0;
}
