/* A hostile guest program: it talks over a vSocket connection, then finds
 * that connection's shared memory in its own address space and scribbles
 * over it, as any tenant program can.
 *
 *     scribbler ADDR PORT MODE SCENARIO HOLD_MS
 *
 * MODE "echo": sends the pattern byte(i) = (i % 251 + i / 251) & 0xff in
 * round trips to hostile_peer.py and checks the echo. MODE "redis": sends
 * ten SET hostile:<n> commands and reads their +OK.
 *
 * The connection's memory is two halves (layout in crates/abi/src/layout.rs):
 * ours, mapped read-write, and the peer's, mapped read-only. SCENARIO:
 *   tail_ahead  our ring's tail far beyond the peer's head of it
 *   head_ahead  our head of the peer's ring beyond its tail
 *   huge        both our indices set to 2^64-1
 *   flags       every flags, waiting and woken word of ours set to all ones
 *   holders     our endpoint holder count set to 0x7fffffff
 *   header      magic, version and ring_size of our half overwritten
 *   random      random bytes over our half's whole header page
 *   peer        tries to write the peer's half: makes it writable with
 *               mprotect, and writes it through /proc/self/mem; prints
 *               "peer_write=refused" when both fail
 *   rewind      our indices (our ring's tail, our head of the peer's ring)
 *               moved back by whole rings once more than two rings passed
 *               each way, which keeps every offset the same but makes our
 *               totals smaller: an attempt to be metered for less than was
 *               moved; then one more echo exchange is tried
 *               ("after_rewind=ok" or the error)
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
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define LINE 128
/* In either half: the producer line of the ring its end writes, the
 * consumer line of the ring its end reads, the endpoint line. */
#define PRODUCER_LINE LINE
#define CONSUMER_LINE (2 * LINE)
#define ENDPOINT_LINE (3 * LINE)

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

/* The two mappings of our one vSocket connection (/memfd:vsocket-conn):
 * our half is the writable one. */
struct halves {
    unsigned char *own, *peer;
    size_t len;
};

static struct halves find_halves(void) {
    FILE *maps = fopen("/proc/self/maps", "r");
    if (!maps) die("/proc/self/maps");
    char line[512];
    struct halves h = {0};
    int found = 0;
    while (fgets(line, sizeof line, maps)) {
        if (!strstr(line, "vsocket-conn")) continue;
        unsigned long start, end;
        char perms[8];
        if (sscanf(line, "%lx-%lx %7s", &start, &end, perms) != 3) continue;
        unsigned char **slot = perms[1] == 'w' ? &h.own : &h.peer;
        if (*slot) {
            fprintf(stderr, "scribbler: more than one connection\n");
            exit(1);
        }
        *slot = (unsigned char *)start;
        h.len = end - start;
        found++;
    }
    fclose(maps);
    if (!h.own || !h.peer) {
        fprintf(stderr, "scribbler: %d vsocket-conn mappings, not our half and the peer's (not over vSocket?)\n",
                found);
        exit(1);
    }
    return h;
}

static volatile uint64_t *u64_at(unsigned char *seg, size_t off) { return (volatile uint64_t *)(seg + off); }
static volatile uint32_t *u32_at(unsigned char *seg, size_t off) { return (volatile uint32_t *)(seg + off); }

/* Tries to change one word of the peer's half in two ways; both must fail. */
static void write_peer(unsigned char *peer, size_t len) {
    int protected = mprotect(peer, len, PROT_READ | PROT_WRITE) != 0;
    int mem = open("/proc/self/mem", O_RDWR);
    if (mem < 0) die("/proc/self/mem");
    uint64_t forged = 0;
    int through_mem = pwrite(mem, &forged, sizeof forged, (off_t)(uintptr_t)(peer + PRODUCER_LINE)) != sizeof forged;
    close(mem);
    if (protected && through_mem)
        printf("peer_write=refused\n");
    else
        printf("peer_write=ALLOWED mprotect=%s proc_mem=%s\n", protected ? "refused" : "allowed",
               through_mem ? "refused" : "allowed");
}

static void scribble(struct halves h, const char *scenario) {
    unsigned char *seg = h.own;
    uint32_t ring_size = *u32_at(seg, 12);
    if ((size_t)PAGE + (size_t)ring_size != h.len) {
        fprintf(stderr, "scribbler: half of %zu bytes for a ring of %u\n", h.len, ring_size);
        exit(1);
    }
    if (!strcmp(scenario, "tail_ahead")) {
        *u64_at(seg, PRODUCER_LINE) = *u64_at(h.peer, CONSUMER_LINE) + ((uint64_t)1 << 40);
    } else if (!strcmp(scenario, "head_ahead")) {
        *u64_at(seg, CONSUMER_LINE) = *u64_at(h.peer, PRODUCER_LINE) + 12345;
    } else if (!strcmp(scenario, "huge")) {
        *u64_at(seg, PRODUCER_LINE) = UINT64_MAX;
        *u64_at(seg, CONSUMER_LINE) = UINT64_MAX;
    } else if (!strcmp(scenario, "flags")) {
        for (size_t off = 8; off < 32; off += 4) {
            *u32_at(seg, PRODUCER_LINE + off) = 0xffffffffu;
            *u32_at(seg, CONSUMER_LINE + off) = 0xffffffffu;
        }
    } else if (!strcmp(scenario, "holders")) {
        *u32_at(seg, ENDPOINT_LINE) = 0x7fffffffu;
    } else if (!strcmp(scenario, "header")) {
        memset(seg, 0xff, 64);
    } else if (!strcmp(scenario, "peer")) {
        write_peer(h.peer, h.len);
    } else if (!strcmp(scenario, "rewind")) {
        uint64_t total = 0;
        for (size_t line = PRODUCER_LINE; line <= CONSUMER_LINE; line += LINE) {
            uint64_t index = *u64_at(seg, line);
            uint64_t back = index - index % ring_size;
            *u64_at(seg, line) -= back;
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
    fflush(stdout);
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

    struct halves h = find_halves();
    /* Rewinding moves indices back by whole rings: first pass more than
     * two rings' worth each way. */
    while (!redis && !strcmp(argv[4], "rewind") && sent < 2 * (h.len - PAGE)) echo_exchange(fd);
    scribble(h, argv[4]);

    if (!strcmp(argv[4], "rewind")) {
        /* What was moved before the rewind, then whether the connection
         * still works (its peer checks the indices we can write). */
        printf("sent=%llu\n", (unsigned long long)sent);
        fflush(stdout);
        unsigned char probe[4096];
        for (size_t i = 0; i < sizeof probe; i++) probe[i] = pat(sent + i);
        ssize_t w = send(fd, probe, sizeof probe, MSG_NOSIGNAL);
        ssize_t r = w == (ssize_t)sizeof probe ? recv(fd, probe, sizeof probe, 0) : -1;
        if (r > 0)
            printf("after_rewind=ok\n");
        else
            printf("after_rewind=%s\n", r == 0 ? "end of stream" : strerror(errno));
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
