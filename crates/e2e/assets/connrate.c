/*
 * connrate: connection set-up rate. Each round opens a connection, sends a
 * byte, waits for the server's byte, and closes.
 *
 *   connrate server ADDR PORT
 *   connrate client ADDR PORT SECONDS     prints "connections_per_second=N"
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: connrate server|client ADDR PORT [SECONDS]\n");
        return 2;
    }
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(atoi(argv[3]));
    inet_pton(AF_INET, argv[2], &sa.sin_addr);
    char byte = 'x';
    if (strcmp(argv[1], "server") == 0) {
        int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(l, (struct sockaddr *)&sa, sizeof sa) || listen(l, 1024)) {
            perror("listen");
            return 1;
        }
        for (;;) {
            int c = accept(l, NULL, NULL);
            if (c < 0) continue;
            if (read(c, &byte, 1) == 1) write(c, &byte, 1);
            close(c);
        }
    }
    double seconds = argc > 4 ? atof(argv[4]) : 3;
    double start = now(), end = start + seconds;
    long count = 0;
    while (now() < end) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(s, (struct sockaddr *)&sa, sizeof sa) || write(s, &byte, 1) != 1 || read(s, &byte, 1) != 1) {
            perror("round");
            return 1;
        }
        close(s);
        count++;
    }
    printf("connections_per_second=%.1f\n", count / (now() - start));
    return 0;
}
