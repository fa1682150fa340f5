// ref: the reference receiver, the original multiqueue patch's "simple program that only does
// the receiving in userspace": it creates a multiqueue TAP and reads each queue with one
// thread in a plain blocking read() loop, counting per queue.
//
//   ref --name NAME --queues N
//
// Prints "ready" once the device is up, then on SIGTERM/SIGINT one JSON line with the
// per-queue frame counts, and exits (the device goes with its fds). Threads are named
// ref-q<N> so CPU time can be read per receiving thread.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_QUEUES 256

struct queue {
    int fd;
    pthread_t thread;
    int index;
    _Alignas(64) volatile uint64_t frames;  // written by its thread only; read at exit
    char pad[56];
};

static struct queue queues[MAX_QUEUES];

static void *reader(void *arg) {
    struct queue *q = arg;
    char name[16];
    snprintf(name, sizeof name, "ref-q%d", q->index);
    pthread_setname_np(pthread_self(), name);
    static __thread char buf[65536 + 64];
    for (;;) {
        ssize_t n = read(q->fd, buf, sizeof buf);
        if (n > 0) q->frames++;
        else if (n < 0 && errno != EINTR) break;
    }
    return NULL;
}

int main(int argc, char **argv) {
    const char *name = NULL;
    int n = 1;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--name")) name = argv[i + 1];
        else if (!strcmp(argv[i], "--queues")) n = atoi(argv[i + 1]);
    }
    if (!name || strlen(name) >= IFNAMSIZ || n < 1 || n > MAX_QUEUES) {
        fprintf(stderr, "usage: ref --name NAME --queues 1..256\n");
        return 2;
    }
    // Signals are taken by sigwait in main only.
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, NULL);

    for (int i = 0; i < n; i++) {
        int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
        if (fd < 0) { perror("ref: open /dev/net/tun"); return 1; }
        struct ifreq ifr = {0};
        strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
        ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE | (i == 0 ? IFF_TUN_EXCL : 0);
        if (ioctl(fd, TUNSETIFF, &ifr) < 0) { perror("ref: TUNSETIFF"); return 1; }
        queues[i].fd = fd;
        queues[i].index = i;
    }
    char path[128];
    snprintf(path, sizeof path, "/proc/sys/net/ipv6/conf/%s/disable_ipv6", name);
    FILE *f = fopen(path, "w");
    if (f) { fputs("1", f); fclose(f); }
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct ifreq up = {0};
    strncpy(up.ifr_name, name, IFNAMSIZ - 1);
    ioctl(s, SIOCGIFFLAGS, &up);
    up.ifr_flags |= IFF_UP;
    if (ioctl(s, SIOCSIFFLAGS, &up) < 0) { perror("ref: SIOCSIFFLAGS"); return 1; }
    close(s);
    for (int i = 0; i < n; i++) pthread_create(&queues[i].thread, NULL, reader, &queues[i]);
    printf("ready\n");
    fflush(stdout);

    int sig;
    sigwait(&set, &sig);
    printf("{\"queues\":[");
    for (int i = 0; i < n; i++) printf("%s%llu", i ? "," : "", (unsigned long long)queues[i].frames);
    printf("]}\n");
    fflush(stdout);
    return 0;  // exit closes every fd; the device goes with the last one
}
