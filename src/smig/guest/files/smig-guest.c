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
 * Static, libc only: it runs from a busybox initramfs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
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

int main(int argc, char **argv)
{
    if (argc == 5 && strcmp(argv[1], "heartbeat") == 0)
        return heartbeat(argv[2], argv[3], atol(argv[4]));
    if (argc == 4 && strcmp(argv[1], "dirty") == 0)
        return dirty(atol(argv[2]), atol(argv[3]));
    fprintf(stderr, "usage: smig-guest heartbeat DEVICE BOOT_ID PERIOD_MS | dirty MBPS WORKING_SET_MB\n");
    return 2;
}
