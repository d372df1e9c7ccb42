/*
 * idle: a connected pair that does nothing. The server waits in epoll_wait,
 * the client too, for SECONDS; then the client prints the
 * CPU time both used (from getrusage), which must be close to zero.
 *
 *   idle server ADDR PORT SECONDS
 *   idle client ADDR PORT SECONDS    prints "cpu_seconds=N"
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

static double cpu(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: idle server|client ADDR PORT SECONDS\n");
        return 2;
    }
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(atoi(argv[3]));
    inet_pton(AF_INET, argv[2], &sa.sin_addr);
    int ms = (int)(atof(argv[4]) * 1000);
    double before;
    char buf[64];
    if (strcmp(argv[1], "server") == 0) {
        int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(l, (struct sockaddr *)&sa, sizeof sa) || listen(l, 4)) return 1;
        int c = accept(l, NULL, NULL);
        before = cpu();
        int ep = epoll_create1(0);
        struct epoll_event ev = {.events = EPOLLIN};
        epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
        /* Idle until the client's report arrives. */
        epoll_wait(ep, &ev, 1, ms + 5000);
        double used = cpu() - before;
        int n = read(c, buf, sizeof buf - 1);
        buf[n > 0 ? n : 0] = 0;
        write(c, &used, sizeof used);
        return 0;
    }
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(s, (struct sockaddr *)&sa, sizeof sa)) return 1;
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    before = cpu();
    /* Idle; nothing comes. */
    struct epoll_event ev;
    int ep = epoll_create1(0);
    ev.events = EPOLLIN;
    epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev);
    epoll_wait(ep, &ev, 1, ms);
    double mine = cpu() - before, theirs = 0;
    write(s, "done", 4);
    if (read(s, &theirs, sizeof theirs) != sizeof theirs) return 1;
    printf("cpu_seconds=%.4f\n", mine + theirs);
    return 0;
}
