// gen: a traffic generator for mqtapd's benchmarks. Sends Ethernet/IPv4/UDP frames out of one
// interface (into a TAP, whose queues the kernel picks by flow hash) through an AF_PACKET
// socket, in batches with sendmmsg. Frames only go to the device named; nothing leaves the
// machine.
//
//   gen --dev NAME --dst MAC [--size 64] [--flows 1024] [--seconds 3 | --count N]
//       [--batch 64] [--cpu N] [--pps N] [--no-bypass]
//
// Prints one JSON line: {"sent":N,"refused":N,"seconds":S}: frames the kernel took, and
// frames it refused (each one is in the device's tx_dropped).
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_BATCH 256

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint16_t checksum(const uint8_t *p, int n) {
    uint32_t sum = 0;
    for (int i = 0; i < n; i += 2) sum += (uint32_t)p[i] << 8 | p[i + 1];
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

// One frame of `size` bytes for `flow` (flow sets the source port and last address byte).
static void build(uint8_t *f, int size, int flow, const uint8_t dst[6]) {
    static const uint8_t src[6] = {0x02, 0, 0, 0, 0, 0x01};
    memset(f, 0, size);
    memcpy(f, dst, 6);
    memcpy(f + 6, src, 6);
    f[12] = 0x08;
    uint8_t *ip = f + 14;
    int ip_len = size - 14;
    ip[0] = 0x45;
    ip[2] = ip_len >> 8; ip[3] = ip_len & 0xff;
    ip[8] = 64; ip[9] = 17;
    ip[12] = 198; ip[13] = 18; ip[14] = 0; ip[15] = 1;         // 198.18.0.0/15: benchmarking
    ip[16] = 198; ip[17] = 18; ip[18] = 1; ip[19] = flow & 0xff;
    uint16_t c = checksum(ip, 20);
    ip[10] = c >> 8; ip[11] = c & 0xff;
    uint8_t *udp = ip + 20;
    int sport = 10000 + flow % 50000;
    udp[0] = sport >> 8; udp[1] = sport & 0xff;
    udp[2] = 0x13; udp[3] = 0x88;
    int ulen = size - 34;
    udp[4] = ulen >> 8; udp[5] = ulen & 0xff;
}

static int parse_mac(const char *s, uint8_t mac[6]) {
    return sscanf(s, "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &mac[0], &mac[1], &mac[2], &mac[3], &mac[4], &mac[5]) == 6;
}

int main(int argc, char **argv) {
    const char *dev = NULL;
    uint8_t dst[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    int size = 64, flows = 1024, batch = 64, cpu = -1, bypass = 1;
    double seconds = 3;
    long long count = -1, pps = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--dev") && v) dev = v, i++;
        else if (!strcmp(a, "--dst") && v) { if (!parse_mac(v, dst)) { fprintf(stderr, "gen: bad --dst\n"); return 2; } i++; }
        else if (!strcmp(a, "--size") && v) size = atoi(v), i++;
        else if (!strcmp(a, "--flows") && v) flows = atoi(v), i++;
        else if (!strcmp(a, "--seconds") && v) seconds = atof(v), i++;
        else if (!strcmp(a, "--count") && v) count = atoll(v), i++;
        else if (!strcmp(a, "--batch") && v) batch = atoi(v), i++;
        else if (!strcmp(a, "--cpu") && v) cpu = atoi(v), i++;
        else if (!strcmp(a, "--pps") && v) pps = atoll(v), i++;
        else if (!strcmp(a, "--no-bypass")) bypass = 0;
        else { fprintf(stderr, "gen: unknown argument %s\n", a); return 2; }
    }
    if (!dev || size < 60 || size > 9000 || flows < 1 || batch < 1 || batch > MAX_BATCH) {
        fprintf(stderr, "usage: gen --dev NAME [--dst MAC] [--size 60..9000] [--flows N] [--seconds S | --count N] [--batch 1..256] [--cpu N]\n");
        return 2;
    }
    if (cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        if (sched_setaffinity(0, sizeof set, &set) < 0) { perror("gen: sched_setaffinity"); return 1; }
    }
    // Protocol 0: this socket only sends; it would otherwise receive every frame on the device.
    int fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);
    if (fd < 0) { perror("gen: socket(AF_PACKET)"); return 1; }
    struct sockaddr_ll addr = {.sll_family = AF_PACKET, .sll_ifindex = (int)if_nametoindex(dev), .sll_halen = 6};
    if (!addr.sll_ifindex) { fprintf(stderr, "gen: no interface %s\n", dev); return 1; }
    memcpy(addr.sll_addr, dst, 6);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) { perror("gen: bind"); return 1; }
    // Straight to the driver's queue selection (tun's flow hash), skipping the qdisc: the
    // generator's own cost stays low, and every frame it counts reached the tap.
    if (bypass) {
        int one = 1;
        setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof one);
    }
    int nframes = flows < 4096 ? flows : 4096;
    uint8_t *frames = malloc((size_t)nframes * size);
    for (int i = 0; i < nframes; i++) build(frames + (size_t)i * size, size, i, dst);

    struct mmsghdr msgs[MAX_BATCH];
    struct iovec iov[MAX_BATCH];
    long long sent = 0, refused = 0;
    int next = 0;
    double start = now(), end = start + seconds;
    long long batches = 0;
    while (count < 0 ? now() < end : sent < count) {
        if (pps > 0) {
            // Paced: batch k leaves no earlier than k * batch / pps seconds after the start.
            double due = start + (double)batches * batch / pps;
            double t;
            while ((t = now()) < due) {
                struct timespec ts = {0, (long)((due - t) * 1e9)};
                nanosleep(&ts, NULL);
            }
        }
        batches++;
        int n = batch;
        if (count >= 0 && count - sent < n) n = (int)(count - sent);
        for (int i = 0; i < n; i++) {
            iov[i].iov_base = frames + (size_t)next * size;
            iov[i].iov_len = size;
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            next = (next + 1) % nframes;
        }
        int r = sendmmsg(fd, msgs, n, 0);
        if (r > 0) sent += r;
        if (r < n) {
            // sendmmsg stops at the first message the device refuses (its queue is stopped;
            // the kernel counts that frame in tx_dropped); the rest were not tried and go
            // out with the next batch.
            refused += 1;
            if (r < 0 && errno != ENOBUFS && errno != EAGAIN && errno != EINTR) { perror("gen: sendmmsg"); break; }
        }
    }
    printf("{\"sent\":%lld,\"refused\":%lld,\"seconds\":%.3f}\n", sent, refused, now() - start);
    close(fd);
    free(frames);
    return 0;
}
