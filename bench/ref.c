// ref: the reference receiver, the original multiqueue patch's "simple program that only does
// the receiving in userspace": it creates a multiqueue TAP and reads each queue with one
// thread in a plain blocking read() loop, counting per queue.
//
//   ref --name NAME --queues N [--mode block|epoll]
//
// --mode epoll reads each queue the way an epoll loop over several queues must: the fd
// non-blocking, epoll_wait, then read() until EAGAIN (at most 64 frames per wake-up). It is
// there to measure what that costs against the blocking loop, in C, without mqtapd.
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
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>


static struct queue queues[MAX_QUEUES];
static int use_epoll;

// The queue's fd is non-blocking; one epoll set per thread, watching only that fd.
static void epoll_loop(struct queue *q, char *buf, size_t size) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, q->fd, &ev) < 0) { perror("epoll"); exit(1); }
    for (;;) {
        if (epoll_wait(ep, &ev, 1, -1) < 0) {
            if (errno == EINTR) continue;
            return;
        }
        for (int i = 0; i < 64; i++) {
            ssize_t n = read(q->fd, buf, size);
            if (n > 0) q->frames++;
            else if (n < 0 && errno == EINTR) continue;
            else break;
        }
    }
}

static void *reader(void *arg) {
    struct queue *q = arg;
    char name[16];
    snprintf(name, sizeof name, "ref-q%d", q->index);
    pthread_setname_np(pthread_self(), name);
    static __thread char buf[65536 + 64];
    if (use_epoll) {
        epoll_loop(q, buf, sizeof buf);
        return NULL;
    }
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
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--mode")) continue;
        if (!strcmp(argv[i + 1], "epoll")) use_epoll = 1;
        else if (strcmp(argv[i + 1], "block")) {
            fprintf(stderr, "ref: --mode is block or epoll, not %s\n", argv[i + 1]);
            return 2;
        }
    }
    return run_receivers(name, n, use_epoll, queues, reader);
}
