// What the benchmark's receivers share: making a multiqueue TAP that is quiet until the
// generator sends (IPv6 off, so no router solicitations), and the stop signals.
#ifndef MQTAPD_BENCH_TAP_H
#define MQTAPD_BENCH_TAP_H
#define _GNU_SOURCE
#include <fcntl.h>
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
#endif
