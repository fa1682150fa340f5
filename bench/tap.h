// What the benchmark's receivers share: making a multiqueue TAP that is quiet until the
// generator sends (IPv6 off, so no router solicitations), and the stop signals.
#ifndef MQTAPD_BENCH_TAP_H
#define MQTAPD_BENCH_TAP_H
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

// Opens `n` queues of a new TAP `name` into fds[] and brings it up. 0, or -1 after perror.
static int make_multiqueue_tap(const char *name, int n, int nonblock, int *fds) {
    for (int i = 0; i < n; i++) {
        int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC | (nonblock ? O_NONBLOCK : 0));
        if (fd < 0) { perror("open /dev/net/tun"); return -1; }
        struct ifreq ifr;
        memset(&ifr, 0, sizeof ifr);
        strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
        ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE | (i == 0 ? IFF_TUN_EXCL : 0);
        if (ioctl(fd, TUNSETIFF, &ifr) < 0) { perror("TUNSETIFF"); return -1; }
        fds[i] = fd;
    }
    char path[128];
    snprintf(path, sizeof path, "/proc/sys/net/ipv6/conf/%s/disable_ipv6", name);
    FILE *f = fopen(path, "w");
    if (f) { fputs("1", f); fclose(f); }
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct ifreq up;
    memset(&up, 0, sizeof up);
    strncpy(up.ifr_name, name, IFNAMSIZ - 1);
    ioctl(s, SIOCGIFFLAGS, &up);
    up.ifr_flags |= IFF_UP;
    int rc = ioctl(s, SIOCSIFFLAGS, &up);
    close(s);
    if (rc < 0) { perror("SIOCSIFFLAGS"); return -1; }
    return 0;
}

// `--name NAME --queues N`; exits with a usage line naming `program` if they are wrong.
static void parse_receiver_args(int argc, char **argv, const char *program, int max_queues,
                                const char **name, int *queues) {
    *name = NULL;
    *queues = 1;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--name")) *name = argv[i + 1];
        else if (!strcmp(argv[i], "--queues")) *queues = atoi(argv[i + 1]);
    }
    if (!*name || strlen(*name) >= IFNAMSIZ || *queues < 1 || *queues > max_queues) {
        fprintf(stderr, "usage: %s --name NAME --queues 1..%d\n", program, max_queues);
        exit(2);
    }
}

// The line a receiver prints when it stops: {"queues":[frames per queue]}.
static void print_counts(const volatile uint64_t *const *counts, int n) {
    printf("{\"queues\":[");
    for (int i = 0; i < n; i++) printf("%s%llu", i ? "," : "", (unsigned long long)*counts[i]);
    printf("]}\n");
    fflush(stdout);
}

// SIGTERM and SIGINT, blocked in every thread so that main can sigwait for them.
static sigset_t block_stop_signals(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    return set;
}

// The kernel's MAX_TAP_QUEUES.
#define MAX_QUEUES 256

// One receiving thread per queue, counting the frames it reads.
struct queue {
    int fd;
    int index;
    pthread_t thread;
    _Alignas(64) volatile uint64_t frames;  // written by its thread only; read at exit
    char pad[56];
};

// What a receiver's main does once its arguments are read: makes the device, starts
// `reader` on each queue, prints "ready", and on SIGTERM/SIGINT prints the per-queue counts.
// Returns main's exit code; the exit closes every fd, and the device goes with the last one.
static int run_receivers(const char *name, int n, int nonblock, struct queue *queues,
                         void *(*reader)(void *)) {
    // Signals are taken by sigwait here only.
    sigset_t set = block_stop_signals();
    int fds[MAX_QUEUES];
    if (n > MAX_QUEUES || make_multiqueue_tap(name, n, nonblock, fds) < 0) return 1;
    for (int i = 0; i < n; i++) {
        queues[i].fd = fds[i];
        queues[i].index = i;
    }
    for (int i = 0; i < n; i++) pthread_create(&queues[i].thread, NULL, reader, &queues[i]);
    printf("ready\n");
    fflush(stdout);
    int sig;
    sigwait(&set, &sig);
    const volatile uint64_t *counts[MAX_QUEUES];
    for (int i = 0; i < n; i++) counts[i] = &queues[i].frames;
    print_counts(counts, n);
    return 0;
}
#endif
