// fwd: the reference forwarder that mqtapd's forward mode is measured against. It joins two
// multiqueue TAPs A and B like a wire: one thread per queue and direction, a blocking read()
// from A's queue i and a write() of the same bytes to B's queue i (and B to A likewise).
//
//   fwd --a NAME --b NAME --queues N [--offload] [--vnet-hdr]
//
// --vnet-hdr opens both devices with IFF_VNET_HDR (the 10-byte struct virtio_net_hdr before
// every frame); --offload implies it and lets the stacks on both sides hand the devices
// unchecksummed TSO (and, where the kernel has them, USO) super-frames, which pass from one
// device to the other unchanged, header included.
//
// Prints "ready" once every queue is open and every thread runs, then on SIGTERM/SIGINT one
// JSON line with per-direction counts (bytes without the vnet header) and exits 0; the
// devices go with the fds unless they are persistent. Threads are named fwd-a<N>/fwd-b<N>.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <linux/virtio_net.h>
#include <net/if.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

// Linux 6.2 added these; Debian 12's headers are older.
#ifndef TUN_F_USO4
#define TUN_F_USO4 0x20
#define TUN_F_USO6 0x40
#endif

// The kernel's MAX_TAP_QUEUES.
#define MAX_QUEUES 256
#define HDR_SIZE ((int)sizeof(struct virtio_net_hdr))
#define BUF_SIZE (65536 + HDR_SIZE)

// One direction of one queue: reads `from`, writes `to`.
struct pipe {
    int from, to;
    char name[16];
    pthread_t thread;
    // Written by its thread only; main reads them at exit.
    _Alignas(64) volatile uint64_t frames, bytes, gso, errors;
};

static struct pipe pipes[2][MAX_QUEUES];  // [0]: A to B, [1]: B to A
static int hdr;                           // vnet header bytes before each frame: 0 or HDR_SIZE

static void *forward(void *arg) {
    struct pipe *p = arg;
    pthread_setname_np(pthread_self(), p->name);
    static __thread char buf[BUF_SIZE];
    for (;;) {
        ssize_t n = read(p->from, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        // EFAULT is what a queue reads once its device is gone (e.g. its netns was deleted).
        if (n < 0) { fprintf(stderr, "%s: read: %s\n", p->name, strerror(errno)); return NULL; }
        // tun would cut a longer frame silently, but none is: a super-frame is at most 65536
        // bytes (gso_max_size), a plain one at most 65535 (the MTU at most 65521).
        if (n <= hdr) { p->errors++; continue; }
        // A tap write is one whole frame or an error; a refused frame is dropped, as on a wire.
        if (write(p->to, buf, n) != n) { p->errors++; continue; }
        p->frames++;
        p->bytes += n - hdr;
        if (hdr && ((struct virtio_net_hdr *)buf)->gso_type != VIRTIO_NET_HDR_GSO_NONE) p->gso++;
    }
}

// Opens queue fds of TAP `name`, creating it if need be, with or without the vnet header.
// 0, or -1 after a message.
static int open_tap(const char *name, int n, int *fds) {
    for (int i = 0; i < n; i++) {
        int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
        if (fd < 0) { perror("open /dev/net/tun"); return -1; }
        struct ifreq ifr;
        memset(&ifr, 0, sizeof ifr);
        strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
        ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE | (hdr ? IFF_VNET_HDR : 0);
        if (ioctl(fd, TUNSETIFF, &ifr) < 0) { perror(name); return -1; }
        // The device's first queue decided its flags; a joining queue's are ignored, so a
        // device made by someone else could carry a header we do not expect (or lack one).
        if (ioctl(fd, TUNGETIFF, &ifr) < 0) { perror("TUNGETIFF"); return -1; }
        if (!!(ifr.ifr_flags & IFF_VNET_HDR) != !!hdr || !(ifr.ifr_flags & IFF_NO_PI)) {
            fprintf(stderr, "fwd: %s exists with other flags (0x%x)\n", name,
                    (unsigned)ifr.ifr_flags & 0xffff);
            return -1;
        }
        fds[i] = fd;
    }
    return 0;
}

// Offloads are per device, set through any of its fds. Returns the names of those set, or NULL.
static const char *set_offload(const char *name, int fd) {
    unsigned tso = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
    // A kernel that does not know a flag refuses the whole call.
    if (!ioctl(fd, TUNSETOFFLOAD, tso | TUN_F_USO4 | TUN_F_USO6)) return "csum,tso4,tso6,uso4,uso6";
    if (!ioctl(fd, TUNSETOFFLOAD, tso)) return "csum,tso4,tso6";
    perror(name);
    return NULL;
}

static void print_direction(const char *key, struct pipe *p, int n) {
    uint64_t frames = 0, bytes = 0, gso = 0, errors = 0;
    for (int i = 0; i < n; i++) {
        frames += p[i].frames;
        bytes += p[i].bytes;
        gso += p[i].gso;
        errors += p[i].errors;
    }
    printf("\"%s\":{\"frames\":%llu,\"bytes\":%llu,\"gso_frames\":%llu,\"errors\":%llu,"
           "\"queues\":[", key, (unsigned long long)frames, (unsigned long long)bytes,
           (unsigned long long)gso, (unsigned long long)errors);
    for (int i = 0; i < n; i++) printf("%s%llu", i ? "," : "", (unsigned long long)p[i].frames);
    printf("]}");
}

static void usage(void) {
    fprintf(stderr, "usage: fwd --a NAME --b NAME --queues 1..%d [--offload] [--vnet-hdr]\n",
            MAX_QUEUES);
    exit(2);
}

int main(int argc, char **argv) {
    const char *name[2] = {NULL, NULL};
    int n = 1, offload = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--offload")) offload = 1;
        else if (!strcmp(argv[i], "--vnet-hdr")) hdr = HDR_SIZE;
        else if (i + 1 == argc) usage();
        else if (!strcmp(argv[i], "--a")) name[0] = argv[++i];
        else if (!strcmp(argv[i], "--b")) name[1] = argv[++i];
        else if (!strcmp(argv[i], "--queues")) n = atoi(argv[++i]);
        else usage();
    }
    if (!name[0] || !name[1] || !strcmp(name[0], name[1]) || strlen(name[0]) >= IFNAMSIZ ||
        strlen(name[1]) >= IFNAMSIZ || n < 1 || n > MAX_QUEUES)
        usage();
    if (offload) hdr = HDR_SIZE;

    // SIGTERM and SIGINT are blocked in every thread (they inherit the mask), so that main
    // alone takes them, with sigwait.
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    pthread_sigmask(SIG_BLOCK, &stop, NULL);

    static int fds[2][MAX_QUEUES];
    const char *set = NULL;
    for (int d = 0; d < 2; d++) {
        if (open_tap(name[d], n, fds[d]) < 0) return 1;
        if (offload && !(set = set_offload(name[d], fds[d][0]))) return 1;
    }
    if (set) fprintf(stderr, "fwd: offloads %s\n", set);
    for (int d = 0; d < 2; d++)
        for (int i = 0; i < n; i++) {
            struct pipe *p = &pipes[d][i];
            p->from = fds[d][i];
            p->to = fds[!d][i];
            snprintf(p->name, sizeof p->name, "fwd-%c%d", d ? 'b' : 'a', i);
            int err = pthread_create(&p->thread, NULL, forward, p);
            if (err) { fprintf(stderr, "fwd: pthread_create: %s\n", strerror(err)); return 1; }
        }
    printf("ready\n");
    fflush(stdout);

    int sig;
    sigwait(&stop, &sig);
    printf("{\"queues\":%d,\"vnet_hdr\":%d,\"offload\":\"%s\",", n, hdr, set ? set : "");
    print_direction("a_to_b", pipes[0], n);
    printf(",");
    print_direction("b_to_a", pipes[1], n);
    printf("}\n");
    fflush(stdout);
    // exit() ends the forwarding threads with the process.
    return 0;
}
