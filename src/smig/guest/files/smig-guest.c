/*
 * smig-guest: the workload inside SMIG's test guests.
 *
 *   smig-guest heartbeat DEVICE BOOT_ID PERIOD_MS
 *       Writes "SMIG-HB <boot_id> <counter> <uptime_ms>" to DEVICE every PERIOD_MS.
 *       The host reads these lines to prove the guest keeps running (counter rises)
 *       and was not rebooted (boot id unchanged) across a live migration.
 *
 *   smig-guest dirty MBPS WORKING_SET_MB
 *       Dirties MBPS MiB of guest memory per second, cycling over a working set of
 *       WORKING_SET_MB MiB. Every page gets a fresh non-zero word: QEMU sends zero
 *       pages almost for free, so a zero-writing dirtier would not load migration.
 *
 *   smig-guest work KIND DEVICE [ARGS]
 *       A workload whose progress the host reads, for the overhead benchmark. Every
 *       REPORT_MS it writes "SMIG-WL <kind> <units> <uptime_ms> <late_us>" to DEVICE:
 *         compute              units: rounds of an integer mix (CPU only)
 *         disk BLOCKDEV        units: KiB written and read back, O_DIRECT, 1 MiB at a time
 *         net IP PORT          units: KiB sent over one TCP connection
 *         idle                 units: 10 ms timer ticks; late_us: their summed wake-up lateness
 *       Counters are cumulative, so the host takes differences over any window it likes.
 *
 * Static, libc only: it runs from a busybox initramfs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void sleep_until(struct timespec *next, long step_ns)
{
    next->tv_nsec += step_ns;
    while (next->tv_nsec >= 1000000000L) {
        next->tv_nsec -= 1000000000L;
        next->tv_sec += 1;
    }
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, next, NULL) == EINTR)
        ;
}

static int heartbeat(const char *dev, const char *boot_id, long period_ms)
{
    int fd = open(dev, O_WRONLY | O_NOCTTY);
    if (fd < 0) {
        perror(dev);
        return 1;
    }
    uint64_t counter = 0;
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (;;) {
        char line[160];
        int n = snprintf(line, sizeof line, "SMIG-HB %s %llu %llu\n", boot_id,
                         (unsigned long long)counter, (unsigned long long)now_ms());
        if (write(fd, line, (size_t)n) < 0 && errno != EAGAIN && errno != EINTR) {
            perror("write");
        }
        counter++;
        sleep_until(&next, period_ms * 1000000L);
    }
}

static int dirty(long mbps, long ws_mb)
{
    if (mbps <= 0)
        return 0;
    if (ws_mb <= 0)
        ws_mb = 1;
    size_t size = (size_t)ws_mb << 20;
    uint8_t *buf = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    size_t pages = size / PAGE;
    /* Fill once with a non-zero pattern so no page of the working set is a zero page. */
    for (size_t i = 0; i < size; i += 8)
        *(uint64_t *)(buf + i) = 0x5a5a5a5a5a5a5a5aULL ^ i;
    /* 100 ticks a second; each tick dirties its share of pages. */
    const long ticks = 100;
    double per_tick = (double)mbps * 256.0 / (double)ticks; /* 256 pages per MiB */
    double owed = 0.0;
    size_t page = 0;
    uint64_t stamp = 1;
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (;;) {
        owed += per_tick;
        while (owed >= 1.0) {
            uint64_t *word = (uint64_t *)(buf + page * PAGE + (stamp % (PAGE / 8)) * 8);
            *word = stamp++ | 1;
            page = (page + 1) % pages;
            owed -= 1.0;
        }
        sleep_until(&next, 1000000000L / ticks);
    }
}

#define REPORT_MS 250
#define IO_BLOCK (1UL << 20)

struct progress {
    int fd;
    const char *kind;
    uint64_t units;
    uint64_t late_us;
    uint64_t next_ms;
};

static void report(struct progress *p)
{
    uint64_t now = now_ms();
    if (now < p->next_ms)
        return;
    char line[160];
    int n = snprintf(line, sizeof line, "SMIG-WL %s %llu %llu %llu\n", p->kind, (unsigned long long)p->units,
                     (unsigned long long)now, (unsigned long long)p->late_us);
    if (write(p->fd, line, (size_t)n) < 0 && errno != EAGAIN && errno != EINTR)
        perror("write");
    p->next_ms = now + REPORT_MS;
}

static _Noreturn void work_compute(struct progress *p)
{
    uint64_t x = 0x9e3779b97f4a7c15ULL;
    volatile uint64_t sink = 0;
    for (;;) {
        for (int i = 0; i < (1 << 16); i++) {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            sink += x * 0x2545f4914f6cdd1dULL;
        }
        p->units++;
        report(p);
    }
}

static int work_disk(struct progress *p, const char *dev)
{
    /* The disk's node appears once its driver has probed, which may be after /init got here. */
    int fd = -1;
    for (int tries = 0; tries < 100 && fd < 0; tries++) {
        fd = open(dev, O_RDWR | O_DIRECT);
        if (fd < 0 && errno == ENOENT)
            usleep(100000);
        else
            break;
    }
    if (fd < 0) {
        perror(dev);
        return 1;
    }
    off_t size = lseek(fd, 0, SEEK_END);
    if (size < (off_t)IO_BLOCK) {
        fprintf(stderr, "%s: too small for 1 MiB blocks\n", dev);
        return 1;
    }
    void *buf;
    if (posix_memalign(&buf, 4096, IO_BLOCK) != 0) {
        perror("posix_memalign");
        return 1;
    }
    uint64_t stamp = 1;
    off_t off = 0;
    for (;;) {
        for (size_t i = 0; i < IO_BLOCK; i += 8)
            *(uint64_t *)((uint8_t *)buf + i) = stamp ^ i;
        if (pwrite(fd, buf, IO_BLOCK, off) != (ssize_t)IO_BLOCK || pread(fd, buf, IO_BLOCK, off) != (ssize_t)IO_BLOCK) {
            perror("disk I/O");
            return 1;
        }
        if (*(uint64_t *)buf != stamp) {
            fprintf(stderr, "%s: read back other data than written\n", dev);
            return 1;
        }
        stamp++;
        off += IO_BLOCK;
        if (off + (off_t)IO_BLOCK > size)
            off = 0;
        p->units += 2 * (IO_BLOCK >> 10);
        report(p);
    }
}

static _Noreturn void work_net(struct progress *p, const char *ip, int port)
{
    static char buf[64 << 10];
    memset(buf, 0xa5, sizeof buf);
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, ip, &to.sin_addr) != 1) {
        fprintf(stderr, "net: bad address %s\n", ip);
        exit(1);
    }
    for (;;) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0 || connect(s, (struct sockaddr *)&to, sizeof to) < 0) {
            perror("net: connect");
            if (s >= 0)
                close(s);
            sleep(1);
            continue;
        }
        for (;;) {
            ssize_t n = write(s, buf, sizeof buf);
            if (n <= 0)
                break;
            p->units += (uint64_t)n >> 10;
            report(p);
        }
        perror("net: send");
        close(s);
    }
}

static _Noreturn void work_idle(struct progress *p)
{
    const long tick_ns = 10000000L;
    struct timespec next, now;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (;;) {
        sleep_until(&next, tick_ns);
        clock_gettime(CLOCK_MONOTONIC, &now);
        int64_t late = (int64_t)(now.tv_sec - next.tv_sec) * 1000000000LL + (now.tv_nsec - next.tv_nsec);
        if (late > 0)
            p->late_us += (uint64_t)late / 1000u;
        p->units++;
        report(p);
    }
}

static int work(int argc, char **argv)
{
    struct progress p = {.kind = argv[2], .next_ms = 0};
    p.fd = open(argv[3], O_WRONLY | O_NOCTTY);
    if (p.fd < 0) {
        perror(argv[3]);
        return 1;
    }
    if (argc == 4 && strcmp(argv[2], "compute") == 0)
        work_compute(&p);
    if (argc == 4 && strcmp(argv[2], "idle") == 0)
        work_idle(&p);
    if (argc == 5 && strcmp(argv[2], "disk") == 0)
        return work_disk(&p, argv[4]);
    if (argc == 6 && strcmp(argv[2], "net") == 0)
        work_net(&p, argv[4], atoi(argv[5]));
    fprintf(stderr, "usage: smig-guest work compute|idle DEVICE | disk DEVICE BLOCKDEV | net DEVICE IP PORT\n");
    return 2;
}

int main(int argc, char **argv)
{
    if (argc == 5 && strcmp(argv[1], "heartbeat") == 0)
        return heartbeat(argv[2], argv[3], atol(argv[4]));
    if (argc == 4 && strcmp(argv[1], "dirty") == 0)
        return dirty(atol(argv[2]), atol(argv[3]));
    if (argc >= 4 && strcmp(argv[1], "work") == 0)
        return work(argc, argv);
    fprintf(stderr, "usage: smig-guest heartbeat DEVICE BOOT_ID PERIOD_MS | dirty MBPS WORKING_SET_MB | work KIND DEVICE [ARGS]\n");
    return 2;
}
