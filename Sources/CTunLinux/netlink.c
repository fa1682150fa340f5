// rtnetlink: one link's attributes (RTM_GETLINK) and its deletion (RTM_DELLINK), by index or
// name. Apart from tunlinux.c, which keeps the ioctls, threads and sockets.
#include "CTunLinux.h"
#include <errno.h>
#include <string.h>
#include <unistd.h>
#include <net/if.h>
#include <sys/socket.h>
#include <linux/if_link.h>
#include <linux/if_tun.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>

// One rtnetlink request about one link (an ifinfomsg with its index, or with IFLA_IFNAME when
// `name` is given) and its answer, read into `buf`: the byte count, or -errno.
static ssize_t link_request(int ifindex, const char *name, int type, int flags, char *buf, size_t cap) {
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (fd < 0) return -errno;
    struct {
        struct nlmsghdr nh;
        struct ifinfomsg ifi;
        char attrs[RTA_SPACE(IFNAMSIZ)];
    } req;
    memset(&req, 0, sizeof req);
    req.nh.nlmsg_len = NLMSG_LENGTH(sizeof(struct ifinfomsg));
    req.nh.nlmsg_type = type;
    req.nh.nlmsg_flags = NLM_F_REQUEST | flags;
    req.nh.nlmsg_seq = 1;
    req.ifi.ifi_family = AF_UNSPEC;
    req.ifi.ifi_index = ifindex;
    if (name != NULL) {
        size_t n = strnlen(name, IFNAMSIZ);
        if (n == 0 || n >= IFNAMSIZ) { close(fd); return -EINVAL; }
        struct rtattr *a = (struct rtattr *)((char *)&req + NLMSG_ALIGN(req.nh.nlmsg_len));
        a->rta_type = IFLA_IFNAME;
        a->rta_len = RTA_LENGTH(n + 1);
        memcpy(RTA_DATA(a), name, n);  // the terminating NUL is the memset's
        req.nh.nlmsg_len = NLMSG_ALIGN(req.nh.nlmsg_len) + RTA_ALIGN(a->rta_len);
    }
    struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
    if (sendto(fd, &req, req.nh.nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof kernel) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    ssize_t n;
    do { n = recv(fd, buf, cap, 0); } while (n < 0 && errno == EINTR);
    int e = n < 0 ? errno : 0;
    close(fd);
    return n < 0 ? -e : n;
}

// IFLA_INFO_DATA of a tun link: its driver's attributes.
static void read_tun_info(struct rtattr *linkinfo, mqt_link_info *out) {
    int len = (int)RTA_PAYLOAD(linkinfo);
    struct rtattr *kind = NULL, *data = NULL;
    for (struct rtattr *a = RTA_DATA(linkinfo); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
        if (a->rta_type == IFLA_INFO_KIND) kind = a;
        if (a->rta_type == IFLA_INFO_DATA) data = a;
    }
    if (kind == NULL || strncmp(RTA_DATA(kind), "tun", RTA_PAYLOAD(kind)) != 0 || data == NULL) return;
    out->is_tun = 1;
    int dlen = (int)RTA_PAYLOAD(data);
    for (struct rtattr *a = RTA_DATA(data); RTA_OK(a, dlen); a = RTA_NEXT(a, dlen)) {
        uint32_t u32 = 0;
        uint8_t u8 = 0;
        // Attributes are only 4-byte aligned: copied out, never cast in place.
        if (RTA_PAYLOAD(a) >= sizeof u32) memcpy(&u32, RTA_DATA(a), sizeof u32);
        if (RTA_PAYLOAD(a) >= sizeof u8) memcpy(&u8, RTA_DATA(a), sizeof u8);
        switch (a->rta_type) {
        case IFLA_TUN_PERSIST: out->tun_persist = u8; break;
        case IFLA_TUN_NUM_QUEUES: out->tun_queues = (int)u32; break;
        case IFLA_TUN_NUM_DISABLED_QUEUES: out->tun_disabled_queues = (int)u32; break;
        case IFLA_TUN_OWNER: out->has_tun_owner = 1; out->tun_owner = u32; break;
        case IFLA_TUN_TYPE: out->tun_type = u8; break;
        case IFLA_TUN_PI: out->tun_pi = u8; break;
        case IFLA_TUN_VNET_HDR: out->tun_vnet_hdr = u8; break;
        case IFLA_TUN_MULTI_QUEUE: out->tun_multi_queue = u8; break;
        case IFLA_TUN_GROUP: out->has_tun_group = 1; out->tun_group = u32; break;
        }
    }
}

int mqt_link_info_get(int ifindex, const char *name, mqt_link_info *out) {
    // One RTM_NEWLINK (or an error) answers; its attributes fit in 32 KiB with room to spare.
    static __thread char buf[32768];
    memset(out, 0, sizeof *out);
    ssize_t n = link_request(ifindex, ifindex == 0 ? name : NULL, RTM_GETLINK, 0, buf, sizeof buf);
    if (n < 0) return (int)n;
    for (struct nlmsghdr *nh = (struct nlmsghdr *)buf; NLMSG_OK(nh, (size_t)n); nh = NLMSG_NEXT(nh, n)) {
        if (nh->nlmsg_type == NLMSG_ERROR) {
            struct nlmsgerr *err = NLMSG_DATA(nh);
            return err->error ? err->error : -EIO;
        }
        if (nh->nlmsg_type != RTM_NEWLINK) continue;
        struct ifinfomsg *ifi = NLMSG_DATA(nh);
        out->ifindex = ifi->ifi_index;
        out->flags = ifi->ifi_flags;
        int len = (int)IFLA_PAYLOAD(nh);
        for (struct rtattr *a = IFLA_RTA(ifi); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
            switch (a->rta_type) {
            case IFLA_IFNAME: {
                size_t k = RTA_PAYLOAD(a) < sizeof out->name ? RTA_PAYLOAD(a) : sizeof out->name - 1;
                memcpy(out->name, RTA_DATA(a), k);
                out->name[sizeof out->name - 1] = 0;
                break;
            }
            case IFLA_MTU:
                if (RTA_PAYLOAD(a) >= sizeof out->mtu) memcpy(&out->mtu, RTA_DATA(a), sizeof out->mtu);
                break;
            case IFLA_STATS64:
                if (RTA_PAYLOAD(a) >= sizeof(struct rtnl_link_stats64)) {
                    struct rtnl_link_stats64 st;
                    memcpy(&st, RTA_DATA(a), sizeof st);
                    out->stats.rx_packets = st.rx_packets; out->stats.tx_packets = st.tx_packets;
                    out->stats.rx_bytes = st.rx_bytes; out->stats.tx_bytes = st.tx_bytes;
                    out->stats.rx_errors = st.rx_errors; out->stats.tx_errors = st.tx_errors;
                    out->stats.rx_dropped = st.rx_dropped; out->stats.tx_dropped = st.tx_dropped;
                    out->has_stats = 1;
                }
                break;
            case IFLA_LINKINFO:
                read_tun_info(a, out);
                break;
            case IFLA_CARRIER:
                if (RTA_PAYLOAD(a) >= 1) out->carrier = *(const uint8_t *)RTA_DATA(a);
                break;
            }
        }
        return 0;
    }
    return -EIO;
}

int mqt_link_delete(int ifindex) {
    // ACK: the kernel answers with an NLMSG_ERROR whose error is 0 on success.
    char buf[4096];
    ssize_t n = link_request(ifindex, NULL, RTM_DELLINK, NLM_F_ACK, buf, sizeof buf);
    if (n < 0) return (int)n;
    for (struct nlmsghdr *nh = (struct nlmsghdr *)buf; NLMSG_OK(nh, (size_t)n); nh = NLMSG_NEXT(nh, n)) {
        if (nh->nlmsg_type == NLMSG_ERROR) {
            struct nlmsgerr *err = NLMSG_DATA(nh);
            return err->error;
        }
    }
    return -EIO;
}
