// What the benchmark's receivers share: making a multiqueue TAP that is quiet until the
// generator sends (IPv6 off, so no router solicitations), and the stop signals.
#ifndef MQTAPD_BENCH_TAP_H
#define MQTAPD_BENCH_TAP_H
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <signal.h>
#include <stdio.h>
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
