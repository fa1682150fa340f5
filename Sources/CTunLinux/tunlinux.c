#define _GNU_SOURCE
#include "CTunLinux.h"
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/if_tun.h>
#include <linux/nsfs.h>
#include <sched.h>
#include <linux/sockios.h>
#include <net/if_arp.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/if_link.h>
#include <sys/socket.h>
#include <unistd.h>

const unsigned long mqt_TUNSETIFF = TUNSETIFF;
const unsigned long mqt_TUNSETQUEUE = TUNSETQUEUE;
const unsigned long mqt_TUNSETPERSIST = TUNSETPERSIST;
const unsigned long mqt_TUNGETFEATURES = TUNGETFEATURES;
const unsigned long mqt_TUNSETOFFLOAD = TUNSETOFFLOAD;
const unsigned long mqt_TUNSETOWNER = TUNSETOWNER;
const unsigned long mqt_TUNSETGROUP = TUNSETGROUP;
#ifndef TUNGETDEVNETNS
#define TUNGETDEVNETNS _IO('T', 227)
#endif
const unsigned long mqt_TUNGETDEVNETNS = TUNGETDEVNETNS;
const unsigned long mqt_TUNGETVNETHDRSZ = TUNGETVNETHDRSZ;
const unsigned long mqt_TUNSETVNETHDRSZ = TUNSETVNETHDRSZ;
const unsigned long mqt_TUNGETVNETLE = TUNGETVNETLE;
const unsigned long mqt_TUNSETVNETLE = TUNSETVNETLE;
const unsigned long mqt_TUNGETVNETBE = TUNGETVNETBE;
const unsigned long mqt_TUNSETVNETBE = TUNSETVNETBE;
const unsigned long mqt_TUNSETSTEERINGEBPF = TUNSETSTEERINGEBPF;
const unsigned long mqt_TUNSETFILTEREBPF = TUNSETFILTEREBPF;
const unsigned long mqt_SIOCGIFFLAGS = SIOCGIFFLAGS;
const unsigned long mqt_SIOCSIFFLAGS = SIOCSIFFLAGS;
const unsigned long mqt_SIOCSIFMTU = SIOCSIFMTU;
const unsigned long mqt_SIOCGIFMTU = SIOCGIFMTU;
const unsigned long mqt_SIOCGIFINDEX = SIOCGIFINDEX;

const int mqt_IFF_TUN = IFF_TUN;
const int mqt_IFF_TAP = IFF_TAP;
const int mqt_IFF_NO_PI = IFF_NO_PI;
const int mqt_IFF_VNET_HDR = IFF_VNET_HDR;
const int mqt_IFF_MULTI_QUEUE = IFF_MULTI_QUEUE;
const int mqt_IFF_TUN_EXCL = IFF_TUN_EXCL;
const int mqt_IFF_ATTACH_QUEUE = IFF_ATTACH_QUEUE;
const int mqt_IFF_DETACH_QUEUE = IFF_DETACH_QUEUE;
const int mqt_IFF_PERSIST = IFF_PERSIST;
const int mqt_IFF_UP = IFF_UP;

// The values the rest of the code relies on, as the kernel ABI defines them.
_Static_assert(TUNSETIFF == 0x400454ca, "TUNSETIFF");
_Static_assert(TUNSETQUEUE == 0x400454d9, "TUNSETQUEUE");
_Static_assert(IFF_MULTI_QUEUE == 0x0100, "IFF_MULTI_QUEUE");
_Static_assert(IFNAMSIZ == 16, "IFNAMSIZ");
_Static_assert(TUN_F_CSUM == 0x01 && TUN_F_TSO4 == 0x02 && TUN_F_TSO6 == 0x04, "TUN_F_*");

int mqt_ioctl(int fd, unsigned long request, void *arg) { return ioctl(fd, request, arg); }

int mqt_pipe_cloexec(int fds[2]) { return pipe2(fds, O_CLOEXEC) == 0 ? 0 : -errno; }

int mqt_ns_is_net(int fd) {
    int t = ioctl(fd, NS_GET_NSTYPE);
    if (t < 0) return -errno;
    return t == CLONE_NEWNET ? 1 : 0;
}

int mqt_tun_clear_txfilter(int fd) {
    // flags 0 (no TUN_FLT_ALLMULTI), count 0: tun_set_tx_filter drops every address.
    struct tun_filter none = { .flags = 0, .count = 0 };
    return ioctl(fd, TUNSETTXFILTER, &none);
}

int mqt_ioctl_value(int fd, unsigned long request, unsigned long value) {
    return ioctl(fd, request, value);
}

static int fill_name(struct ifreq *ifr, const char *name) {
    memset(ifr, 0, sizeof *ifr);
    if (name == NULL) return 0;
    if (strlen(name) >= IFNAMSIZ) { errno = EINVAL; return -1; }
    strncpy(ifr->ifr_name, name, IFNAMSIZ - 1);
    return 0;
}

int mqt_ifreq_ioctl_flags(int fd, unsigned long request, const char *name, int *flags) {
    struct ifreq ifr;
    if (fill_name(&ifr, name) < 0) return -1;
    ifr.ifr_flags = (short)*flags;
    int rc = ioctl(fd, request, &ifr);
    if (rc == 0) *flags = (unsigned short)ifr.ifr_flags;
    return rc;
}

// which: 0 = ifr_mtu, 1 = ifr_ifindex.
int mqt_ifreq_ioctl_int(int fd, unsigned long request, const char *name, int *value, int which) {
    struct ifreq ifr;
    if (fill_name(&ifr, name) < 0) return -1;
    if (which == 0) ifr.ifr_mtu = *value; else ifr.ifr_ifindex = *value;
    int rc = ioctl(fd, request, &ifr);
    if (rc == 0) *value = which == 0 ? ifr.ifr_mtu : ifr.ifr_ifindex;
    return rc;
}

int mqt_ifreq_set_hwaddr(int fd, const char *name, const uint8_t mac[6]) {
    struct ifreq ifr;
    if (fill_name(&ifr, name) < 0) return -1;
    ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
    memcpy(ifr.ifr_hwaddr.sa_data, mac, 6);
    return ioctl(fd, SIOCSIFHWADDR, &ifr);
}

int mqt_ifreq_get_hwaddr(int fd, const char *name, uint8_t mac[6]) {
    struct ifreq ifr;
    if (fill_name(&ifr, name) < 0) return -1;
    int rc = ioctl(fd, SIOCGIFHWADDR, &ifr);
    if (rc == 0) memcpy(mac, ifr.ifr_hwaddr.sa_data, 6);
    return rc;
}

int mqt_tun_getiff(int fd, char *name, int *flags) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    int rc = ioctl(fd, TUNGETIFF, &ifr);
    if (rc == 0) {
        memcpy(name, ifr.ifr_name, IFNAMSIZ);
        name[IFNAMSIZ - 1] = 0;
        *flags = (unsigned short)ifr.ifr_flags;
    }
    return rc;
}

const char *mqt_errno_name(int err) { return strerrorname_np(err); }

void mqt_set_thread_name(const char *name) {
    char buf[16];
    strncpy(buf, name, sizeof buf - 1);
    buf[sizeof buf - 1] = 0;
    pthread_setname_np(pthread_self(), buf);
}

long mqt_send_fds(int sock, const void *buf, unsigned long len, const int *fds, int nfds) {
    if (nfds < 0 || nfds > 253) return -EINVAL;  // SCM_MAX_FD
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    // Room for the largest control message, aligned as cmsghdr needs.
    union {
        char buf[CMSG_SPACE(sizeof(int) * 253)];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (nfds > 0) {
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    ssize_t n;
    do { n = sendmsg(sock, &msg, MSG_NOSIGNAL); } while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : n;
}

long mqt_recv_fds(int sock, void *buf, unsigned long cap, int *fds, int max_fds, int *nfds) {
    if (max_fds < 0 || max_fds > 253) return -EINVAL;
    struct iovec iov = {.iov_base = buf, .iov_len = cap};
    union {
        char buf[CMSG_SPACE(sizeof(int) * 253)];
        struct cmsghdr align;
    } control;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                         .msg_controllen = CMSG_SPACE(sizeof(int) * (max_fds > 0 ? max_fds : 1))};
    ssize_t n;
    do { n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC); } while (n < 0 && errno == EINTR);
    if (n < 0) return -errno;
    *nfds = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < k; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
            if (*nfds < max_fds) fds[(*nfds)++] = fd; else close(fd);
        }
    }
    if (msg.msg_flags & MSG_CTRUNC) return -EMSGSIZE;
    return n;
}

#include <sched.h>
int mqt_setns_net(int fd) { return setns(fd, CLONE_NEWNET) == 0 ? 0 : -errno; }

int mqt_execvpe(const char *file, char *const argv[], char *const envp[]) {
    execvpe(file, argv, envp);
    return -errno;
}

int mqt_peer_cred(int sock, int *pid, unsigned *uid, unsigned *gid) {
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) return -errno;
    *pid = cred.pid;
    *uid = cred.uid;
    *gid = cred.gid;
    return 0;
}

int mqt_socket_family(int sock) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (getsockname(sock, (struct sockaddr *)&ss, &len) < 0) return -errno;
    return ss.ss_family;
}

// Each thread's armed fd. Static TLS of the executable, so the handler's read of it touches no
// allocator; an int read whole, written only by its own thread.
static __thread volatile int kick_fd = -1;

static void kick_handler(int sig) {
    (void)sig;
    // Async-signal-safe: fcntl is on POSIX's list, and errno is put back for the code the
    // signal interrupted.
    int saved = errno;
    int fd = kick_fd;
    if (fd >= 0) {
        int fl = fcntl(fd, F_GETFL);
        if (fl >= 0 && !(fl & O_NONBLOCK)) fcntl(fd, F_SETFL, fl | O_NONBLOCK);
    }
    errno = saved;
}

static int kick_installed;

static void kick_install_once(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = kick_handler;
    sigemptyset(&sa.sa_mask);
    // SA_RESTART: no other thread's system call sees EINTR from a kick, and the interrupted
    // read restarts to find its fd non-blocking.
    sa.sa_flags = SA_RESTART;
    kick_installed = sigaction(SIGURG, &sa, NULL) == 0 ? 0 : -errno;
}

int mqt_kick_install(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, kick_install_once);
    return kick_installed;
}

int mqt_kick_unblock(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGURG);
    int rc = pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    return -rc;
}

void mqt_kick_arm(int fd) { kick_fd = fd; }

int mqt_kick(pthread_t thread) { return pthread_kill(thread, SIGURG); }

int mqt_set_nonblocking(int fd, int on) {
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0) return -errno;
    int want = on ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK);
    if (want != fl && fcntl(fd, F_SETFL, want) < 0) return -errno;
    return 0;
}
