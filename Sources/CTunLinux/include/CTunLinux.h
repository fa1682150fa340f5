#ifndef MQTAPD_CTUNLINUX_H
#define MQTAPD_CTUNLINUX_H
#include <pthread.h>
#include <stdint.h>
#include <net/if.h>
// Not part of Swift's Glibc module; re-exported here for the syscall layer.
#include <sys/epoll.h>
#include <sys/eventfd.h>
// sockaddr_ll, for the test and benchmark frame senders.
#include <linux/if_packet.h>

// ioctl request numbers are _IOW/_IOR macros that Swift cannot import; they are exported
// here as constants, checked against the kernel headers in tunlinux.c.
extern const unsigned long mqt_TUNSETIFF;
extern const unsigned long mqt_TUNSETQUEUE;
extern const unsigned long mqt_TUNSETPERSIST;
extern const unsigned long mqt_TUNGETFEATURES;
extern const unsigned long mqt_TUNSETOFFLOAD;
extern const unsigned long mqt_TUNSETOWNER;
extern const unsigned long mqt_TUNSETGROUP;
extern const unsigned long mqt_TUNGETDEVNETNS;
// Device-wide settings any holder of a queue can change (the daemon reads and puts back).
extern const unsigned long mqt_TUNGETVNETHDRSZ;
extern const unsigned long mqt_TUNSETVNETHDRSZ;
extern const unsigned long mqt_TUNGETVNETLE;
extern const unsigned long mqt_TUNSETVNETLE;
extern const unsigned long mqt_TUNGETVNETBE;
extern const unsigned long mqt_TUNSETVNETBE;
extern const unsigned long mqt_TUNSETSTEERINGEBPF;
extern const unsigned long mqt_TUNSETFILTEREBPF;

// pipe2(O_CLOEXEC), which Glibc's Swift module does not export; 0 or -errno.
int mqt_pipe_cloexec(int fds[2]);

// 1 if `fd` is a network namespace (NS_GET_NSTYPE), 0 if another kind, -errno on failure.
int mqt_ns_is_net(int fd);

// Clears the TX filter (TUNSETTXFILTER with no addresses): every frame passes again.
int mqt_tun_clear_txfilter(int fd);
extern const unsigned long mqt_SIOCGIFFLAGS;
extern const unsigned long mqt_SIOCSIFFLAGS;
extern const unsigned long mqt_SIOCSIFMTU;
extern const unsigned long mqt_SIOCGIFMTU;
extern const unsigned long mqt_SIOCGIFINDEX;

extern const int mqt_IFF_TUN;
extern const int mqt_IFF_TAP;
extern const int mqt_IFF_NO_PI;
extern const int mqt_IFF_VNET_HDR;
extern const int mqt_IFF_MULTI_QUEUE;
extern const int mqt_IFF_TUN_EXCL;
extern const int mqt_IFF_ATTACH_QUEUE;
extern const int mqt_IFF_DETACH_QUEUE;
extern const int mqt_IFF_PERSIST;
extern const int mqt_IFF_UP;

// ioctl is variadic; this is the one non-variadic entry the syscall layer uses.
// Returns the ioctl's result; errno is left as the call set it.
int mqt_ioctl(int fd, unsigned long request, void *arg);
// For requests whose argument is a plain integer (TUNSETPERSIST).
int mqt_ioctl_value(int fd, unsigned long request, unsigned long value);

// TUNSETIFF/TUNSETQUEUE/SIOC* take a struct ifreq; these fill and read the fields we use
// so Swift never has to lay out the union by hand. `name` must be shorter than IFNAMSIZ.
int mqt_ifreq_ioctl_flags(int fd, unsigned long request, const char *name, int *flags);
int mqt_ifreq_ioctl_int(int fd, unsigned long request, const char *name, int *value, int which);
int mqt_ifreq_set_hwaddr(int fd, const char *name, const uint8_t mac[6]);
int mqt_ifreq_get_hwaddr(int fd, const char *name, uint8_t mac[6]);
// Reads the device name bound to a tun fd (TUNGETIFF); `name` has IFNAMSIZ bytes.
int mqt_tun_getiff(int fd, char *name, int *flags);

// The kernel's counters for one interface (dev_get_stats, as sysfs shows them).
typedef struct mqt_link_stats {
    uint64_t rx_packets, tx_packets, rx_bytes, tx_bytes;
    uint64_t rx_errors, tx_errors, rx_dropped, tx_dropped;
} mqt_link_stats;

// One interface as rtnetlink has it: index, name, MTU, flags, counters, and for a tun/tap
// device what its driver reports (IFLA_LINKINFO/IFLA_INFO_DATA): persistence and how many
// queues are attached and detached, whoever holds them.
typedef struct mqt_link_info {
    int ifindex;
    char name[16];
    unsigned int mtu;
    unsigned int flags;  // IFF_*
    mqt_link_stats stats;
    int has_stats;
    int carrier;  // IFLA_CARRIER, whatever the link's admin state
    int is_tun;  // the tun attributes below are set
    int tun_persist;
    int tun_queues;  // attached
    int tun_disabled_queues;  // detached
    int tun_type;  // IFF_TUN or IFF_TAP
    int tun_pi, tun_vnet_hdr, tun_multi_queue;
    int has_tun_owner;  // IFLA_TUN_OWNER was there (the kernel sends it only when set)
    unsigned int tun_owner;
    int has_tun_group;
    unsigned int tun_group;
} mqt_link_info;

// Reads it with one RTM_GETLINK request, by index, or by name when `ifindex` is 0 (in the
// calling thread's network namespace). Returns 0, or -errno (-ENODEV: no such interface).
int mqt_link_info_get(int ifindex, const char *name, mqt_link_info *out);

// Deletes a link by index (RTM_DELLINK): what `ip link del` does, but never by name, so a
// name another interface took meanwhile is never hit. 0, or -errno.
int mqt_link_delete(int ifindex);

// Writes `len` bytes to a connected Unix socket with one SCM_RIGHTS control message carrying
// `nfds` fds (sendmsg, MSG_NOSIGNAL). Returns the bytes written (the fds travel with the
// first byte), or -errno.
long mqt_send_fds(int sock, const void *buf, unsigned long len, const int *fds, int nfds);
// Reads up to `cap` bytes and at most `max_fds` fds passed with them (recvmsg,
// MSG_CMSG_CLOEXEC); `*nfds` gets how many arrived. Returns the bytes read, or -errno;
// -EMSGSIZE if the control message was cut (fds were lost).
long mqt_recv_fds(int sock, void *buf, unsigned long cap, int *fds, int max_fds, int *nfds);
// The peer's pid, uid and gid of a connected Unix socket (SO_PEERCRED); 0 or -errno.
int mqt_peer_cred(int sock, int *pid, unsigned *uid, unsigned *gid);
// The address family a socket is bound to (getsockname): AF_UNIX, AF_INET…, or -errno.
int mqt_socket_family(int sock);

// setns(2) is declared only under _GNU_SOURCE: 0 or -errno.
int mqt_setns_net(int fd);

// execvpe(3) is a GNU extension, declared only under _GNU_SOURCE: -errno if it returns.
int mqt_execvpe(const char *file, char *const argv[], char *const envp[]);

// read(2) and write(2) for the packet path, without glibc's cancellation-point wrapper (two
// extra calls per frame that a thread nobody cancels never needs). -errno on failure.
#include <errno.h>
#include <sys/syscall.h>
#include <unistd.h>
static inline long mqt_read(int fd, void *buf, unsigned long len) {
    long n = syscall(SYS_read, fd, buf, len);
    return n < 0 ? -errno : n;
}
static inline long mqt_write(int fd, const void *buf, unsigned long len) {
    long n = syscall(SYS_write, fd, buf, len);
    return n < 0 ? -errno : n;
}

// Waking a thread that sleeps in a blocking read() of a queue (see TunKit's Kick).
// The thread arms its fd; a SIGURG sent to that thread (pthread_kill) runs a handler that sets
// O_NONBLOCK on the armed fd. A read already asleep is interrupted and restarted (SA_RESTART)
// as a non-blocking read; a read about to start cannot block either. So no wake-up is lost
// between "nothing to do" and entering read(), which a plain signal could not promise.
// Installs the handler process-wide (idempotent); 0 or -errno.
int mqt_kick_install(void);
// Unblocks the kick signal in the calling thread; 0 or -errno.
int mqt_kick_unblock(void);
// Arms the calling thread's fd (-1: disarmed). Only the calling thread's handler reads it.
void mqt_kick_arm(int fd);
// Sends the kick signal to a thread; 0 or an errno value (pthread_kill's convention).
int mqt_kick(pthread_t thread);
// Sets or clears O_NONBLOCK; 0 or -errno.
int mqt_set_nonblocking(int fd, int on);

// strerrorname_np (glibc ≥ 2.32) is declared only under _GNU_SOURCE: "E2BIG" for E2BIG.
// Returns NULL for an unknown number.
const char *mqt_errno_name(int err);

// Names the calling thread (at most 15 characters; longer names are cut).
void mqt_set_thread_name(const char *name);
#endif
