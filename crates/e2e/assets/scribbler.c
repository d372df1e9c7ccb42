/* A hostile guest program: it talks over a vSocket connection, then finds
 * that connection's shared segment in its own address space and scribbles
 * over it, as any tenant program can.
 *
 *     scribbler ADDR PORT MODE SCENARIO HOLD_MS
 *
 * MODE "echo": sends the pattern byte(i) = (i % 251 + i / 251) & 0xff in
 * round trips to hostile_peer.py and checks the echo. MODE "redis": sends
 * ten SET hostile:<n> commands and reads their +OK.
 *
 * Then SCENARIO, on the segment (layout in crates/abi/src/layout.rs):
 *   tail_ahead  ring 0's tail (ours) far beyond its head
 *   head_ahead  ring 0's head (the peer's) beyond its tail
 *   huge        every index set to 2^64-1
 *   flags       every flags and waiting word set to all ones
 *   holders     both endpoint holder counts set to 0x7fffffff
 *   header      magic, version and ring_size overwritten
 *   random      random bytes over the whole header page
 *   rewind      both rings' indices moved back by whole rings while the
 *               connection is quiet, which keeps it working (every offset
 *               stays the same) but makes every ring total smaller: an
 *               attempt to be metered for less than was moved; then a
 *               second echo exchange, checked as the first
 *
 * It then tries to send more (reporting what its own library answers),
 * keeps the connection open for HOLD_MS (so the peer's reaction comes from
 * the scribble, not from our exit), closes it and exits 0. It prints
 * "port=N" (its local port) first and "after_send=..." after the scribble.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define LINE 128
#define PRODUCER_LINE(r) (LINE + (r) * 2 * LINE)
#define CONSUMER_LINE(r) (PRODUCER_LINE(r) + LINE)
#define ENDPOINT_LINE (CONSUMER_LINE(1) + LINE)

static unsigned char pat(uint64_t i) { return (unsigned char)((i % 251 + i / 251) & 0xff); }

static void die(const char *what) {
    fprintf(stderr, "scribbler: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void read_exact(int fd, unsigned char *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = recv(fd, buf + got, n - got, 0);
        if (r <= 0) die("recv before the scribble");
        got += (size_t)r;
    }
}

static uint64_t sent;

static void echo_exchange(int fd) {
    unsigned char out[4096], in[4096];
    for (int round = 0; round < 16; round++) {
        size_t n = 1000 + (size_t)round * 200;
        for (size_t i = 0; i < n; i++) out[i] = pat(sent + i);
        if (send(fd, out, n, 0) != (ssize_t)n) die("send before the scribble");
        read_exact(fd, in, n);
        if (memcmp(in, out, n) != 0) {
            fprintf(stderr, "scribbler: echo differs\n");
            exit(1);
        }
        sent += n;
    }
}

static void redis_exchange(int fd) {
    char cmd[128];
    unsigned char reply[5];
    for (int i = 0; i < 10; i++) {
        char key[32];
        int klen = snprintf(key, sizeof key, "hostile:%d", i);
        int n = snprintf(cmd, sizeof cmd, "*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$1\r\nv\r\n", klen, key);
        if (send(fd, cmd, (size_t)n, 0) != n) die("send before the scribble");
        read_exact(fd, reply, 5);
        if (memcmp(reply, "+OK\r\n", 5) != 0) {
            fprintf(stderr, "scribbler: unexpected redis reply\n");
            exit(1);
        }
    }
}

/* The mapping of our one vSocket connection: /memfd:vsocket-conn. */
static unsigned char *find_segment(size_t *len) {
    FILE *maps = fopen("/proc/self/maps", "r");
    if (!maps) die("/proc/self/maps");
    char line[512];
    unsigned char *found = NULL;
    while (fgets(line, sizeof line, maps)) {
        if (!strstr(line, "vsocket-conn")) continue;
        unsigned long start, end;
        if (sscanf(line, "%lx-%lx", &start, &end) != 2) continue;
        if (found) {
            fprintf(stderr, "scribbler: more than one connection segment\n");
            exit(1);
        }
        found = (unsigned char *)start;
        *len = end - start;
    }
    fclose(maps);
    if (!found) {
        fprintf(stderr, "scribbler: no vsocket-conn mapping (not over vSocket?)\n");
        exit(1);
    }
    return found;
}

static volatile uint64_t *u64_at(unsigned char *seg, size_t off) { return (volatile uint64_t *)(seg + off); }
static volatile uint32_t *u32_at(unsigned char *seg, size_t off) { return (volatile uint32_t *)(seg + off); }

static void scribble(unsigned char *seg, size_t len, const char *scenario) {
    uint32_t ring_size = *u32_at(seg, 12);
    if ((size_t)PAGE + 2 * (size_t)ring_size != len) {
        fprintf(stderr, "scribbler: segment of %zu bytes for rings of %u\n", len, ring_size);
        exit(1);
    }
    if (!strcmp(scenario, "tail_ahead")) {
        *u64_at(seg, PRODUCER_LINE(0)) = *u64_at(seg, CONSUMER_LINE(0)) + ((uint64_t)1 << 40);
    } else if (!strcmp(scenario, "head_ahead")) {
        *u64_at(seg, CONSUMER_LINE(0)) = *u64_at(seg, PRODUCER_LINE(0)) + 12345;
    } else if (!strcmp(scenario, "huge")) {
        for (int r = 0; r < 2; r++) {
            *u64_at(seg, PRODUCER_LINE(r)) = UINT64_MAX;
            *u64_at(seg, CONSUMER_LINE(r)) = UINT64_MAX;
        }
        /* Equal indices would read as empty: break one pair. */
        *u64_at(seg, CONSUMER_LINE(0)) = UINT64_MAX - ((uint64_t)1 << 33);
    } else if (!strcmp(scenario, "flags")) {
        for (int r = 0; r < 2; r++) {
            *u32_at(seg, PRODUCER_LINE(r) + 8) = 0xffffffffu;
            *u32_at(seg, PRODUCER_LINE(r) + 12) = 0xffffffffu;
            *u32_at(seg, CONSUMER_LINE(r) + 8) = 0xffffffffu;
            *u32_at(seg, CONSUMER_LINE(r) + 12) = 0xffffffffu;
        }
    } else if (!strcmp(scenario, "holders")) {
        *u32_at(seg, ENDPOINT_LINE) = 0x7fffffffu;
        *u32_at(seg, ENDPOINT_LINE + 4) = 0x7fffffffu;
    } else if (!strcmp(scenario, "header")) {
        memset(seg, 0xff, 64);
    } else if (!strcmp(scenario, "rewind")) {
        uint64_t total = 0;
        for (int r = 0; r < 2; r++) {
            uint64_t head = *u64_at(seg, CONSUMER_LINE(r));
            uint64_t back = head - head % ring_size;
            *u64_at(seg, PRODUCER_LINE(r)) -= back;
            *u64_at(seg, CONSUMER_LINE(r)) -= back;
            total += back;
        }
        printf("rewound=%llu\n", (unsigned long long)total);
    } else if (!strcmp(scenario, "random")) {
        uint64_t x = 0x9e3779b97f4a7c15ull ^ (uint64_t)getpid();
        for (size_t i = 0; i < PAGE; i += 8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            memcpy(seg + i, &x, 8);
        }
    } else {
        fprintf(stderr, "scribbler: unknown scenario %s\n", scenario);
        exit(2);
    }
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: scribbler ADDR PORT echo|redis SCENARIO HOLD_MS\n");
        return 2;
    }
    int redis = !strcmp(argv[3], "redis");
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &to.sin_addr) != 1) die("address");
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    if (connect(fd, (struct sockaddr *)&to, sizeof to) != 0) die("connect");
    struct sockaddr_in me;
    socklen_t melen = sizeof me;
    if (getsockname(fd, (struct sockaddr *)&me, &melen) != 0) die("getsockname");
    printf("port=%d\n", ntohs(me.sin_port));
    fflush(stdout);

    if (redis)
        redis_exchange(fd);
    else
        echo_exchange(fd);

    size_t len = 0;
    unsigned char *seg = find_segment(&len);
    /* Rewinding moves indices back by whole rings: first pass more than
     * two rings' worth each way. */
    while (!redis && !strcmp(argv[4], "rewind") && sent < 2 * (len - PAGE)) echo_exchange(fd);
    scribble(seg, len, argv[4]);

    if (!strcmp(argv[4], "rewind")) {
        /* The connection must work as before; the total goes to stdout. */
        echo_exchange(fd);
        printf("sent=%llu\n", (unsigned long long)sent);
        fflush(stdout);
        close(fd);
        return 0;
    }

    /* Go on as an honest program would; our own library may notice. */
    unsigned char more[8192];
    for (size_t i = 0; i < sizeof more; i++) more[i] = pat(sent + i);
    if (redis) memcpy(more, "*1\r\n$4\r\nPING\r\n", 14);
    ssize_t r = send(fd, more, redis ? 14 : sizeof more, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r < 0)
        printf("after_send=%s\n", strerror(errno));
    else
        printf("after_send=%zd\n", r);
    fflush(stdout);

    struct timespec hold = {.tv_sec = atoi(argv[5]) / 1000, .tv_nsec = (long)(atoi(argv[5]) % 1000) * 1000000L};
    nanosleep(&hold, NULL);
    close(fd);
    return 0;
}
