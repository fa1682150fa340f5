// uring: a receiver like ref.c, but each queue's thread reads with io_uring multishot reads
// (IORING_OP_READ_MULTISHOT, Linux >= 6.7) from a provided-buffer ring instead of read():
// the batched receive path the benchmark weighs against plain read().
//
//   uring --name NAME --queues N
//
// Prints "ready", then on SIGTERM/SIGINT one JSON line with per-queue frame counts. Threads
// are named uring-q<N>. Frames up to 2048 bytes (the benchmark's sizes).
#define _GNU_SOURCE
#include "tap.h"
#include <errno.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <linux/io_uring.h>
#include <net/if.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#define OP_READ_MULTISHOT 49  // not yet in Debian 12's kernel headers
#define NBUF 512
#define BUFSZ 2048
#define URING_MAX_QUEUES 64  // each queue maps its own ring and buffers

static struct queue queues[URING_MAX_QUEUES];

static void *reader(void *arg) {
    struct queue *q = arg;
    char name[16];
    snprintf(name, sizeof name, "uring-q%d", q->index);
    pthread_setname_np(pthread_self(), name);
    struct io_uring_params p = {0};
    p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    int ring = (int)syscall(__NR_io_uring_setup, 64, &p);
    if (ring < 0) { perror("uring: io_uring_setup"); exit(1); }
    size_t sqsz = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cqsz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    size_t sz = sqsz > cqsz ? sqsz : cqsz;  // IORING_FEAT_SINGLE_MMAP: one mapping for both
    char *sq = mmap(0, sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQ_RING);
    char *cq = sq;
    struct io_uring_sqe *sqes = mmap(0, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
                                     MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQES);
    unsigned *sq_tail = (unsigned *)(sq + p.sq_off.tail), *sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    unsigned *sq_array = (unsigned *)(sq + p.sq_off.array);
    unsigned *cq_head = (unsigned *)(cq + p.cq_off.head), *cq_tail = (unsigned *)(cq + p.cq_off.tail);
    unsigned *cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    struct io_uring_cqe *cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);

    struct io_uring_buf_ring *br = mmap(0, NBUF * sizeof(struct io_uring_buf), PROT_READ | PROT_WRITE,
                                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *bufs = aligned_alloc(64, NBUF * BUFSZ);
    struct io_uring_buf_reg reg = {.ring_addr = (uint64_t)br, .ring_entries = NBUF, .bgid = 0};
    if (syscall(__NR_io_uring_register, ring, IORING_REGISTER_PBUF_RING, &reg, 1) < 0) { perror("uring: PBUF_RING"); exit(1); }
    for (int i = 0; i < NBUF; i++) {
        br->bufs[i].addr = (uint64_t)(bufs + (size_t)i * BUFSZ);
        br->bufs[i].len = BUFSZ;
        br->bufs[i].bid = (unsigned short)i;
    }
    unsigned short btail = NBUF;
    __atomic_store_n(&br->tail, btail, __ATOMIC_RELEASE);

    int arm = 1;  // submit a multishot read now (at start, and whenever one ends)
    for (;;) {
        if (arm) {
            unsigned t = *sq_tail;
            struct io_uring_sqe *e = &sqes[t & *sq_mask];
            memset(e, 0, sizeof *e);
            e->opcode = OP_READ_MULTISHOT;
            e->fd = q->fd;
            e->flags = IOSQE_BUFFER_SELECT;
            e->buf_group = 0;
            e->user_data = 1;
            sq_array[t & *sq_mask] = t & *sq_mask;
            __atomic_store_n(sq_tail, t + 1, __ATOMIC_RELEASE);
        }
        int r = (int)syscall(__NR_io_uring_enter, ring, arm, 1, IORING_ENTER_GETEVENTS, NULL, 0);
        arm = 0;
        if (r < 0 && errno != EINTR) { perror("uring: io_uring_enter"); exit(1); }
        unsigned head = *cq_head, tail = __atomic_load_n(cq_tail, __ATOMIC_ACQUIRE);
        for (; head != tail; head++) {
            struct io_uring_cqe *c = &cqes[head & *cq_mask];
            if (c->res > 0) {
                q->frames++;
                unsigned bid = c->flags >> IORING_CQE_BUFFER_SHIFT;
                struct io_uring_buf *b = &br->bufs[btail & (NBUF - 1)];
                b->addr = (uint64_t)(bufs + (size_t)bid * BUFSZ);
                b->len = BUFSZ;
                b->bid = (unsigned short)bid;
                btail++;
                __atomic_store_n(&br->tail, btail, __ATOMIC_RELEASE);
            }
            if (!(c->flags & IORING_CQE_F_MORE)) arm = 1;  // the multishot read ended (e.g. no buffer left)
        }
        __atomic_store_n(cq_head, head, __ATOMIC_RELEASE);
    }
    return NULL;
}

int main(int argc, char **argv) {
    const char *name;
    int n;
    parse_receiver_args(argc, argv, "uring", URING_MAX_QUEUES, &name, &n);
    return run_receivers(name, n, 1, queues, reader);
}
