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
#include "tap.h"
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
    const char *name;
    int n;
    parse_receiver_args(argc, argv, "ref", MAX_QUEUES, &name, &n);
    // Signals are taken by sigwait in main only.
    sigset_t set = block_stop_signals();
    int fds[MAX_QUEUES];
    if (make_multiqueue_tap(name, n, 0, fds) < 0) return 1;
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
    return 0;  // exit closes every fd; the device goes with the last one
}
