#ifndef MQTAPD_CMICROHTTPD_SHIM_H
#define MQTAPD_CMICROHTTPD_SHIM_H
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>
#include <strings.h>
#include <sys/types.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <microhttpd.h>

// MHD_start_daemon is variadic, which Swift cannot call. This fixes the option list the
// daemon uses, with every argument typed, so no function pointer is cast in Swift.
// One internal epoll polling thread, serving the already listening socket `listen_fd`, which
// MHD closes when it stops. No thread pool: with one, MHD_stop_daemon shuts the listening
// socket down (shutdown(2), which reaches every copy of it, systemd's too) and
// MHD_quiesce_daemon races the pool's threads and aborts (0.9.75).
static inline struct MHD_Daemon *
mqt_mhd_start(int listen_fd,
              MHD_AccessHandlerCallback handler, void *handler_cls,
              MHD_RequestCompletedCallback completed, void *completed_cls,
              MHD_NotifyConnectionCallback notify, void *notify_cls,
              unsigned int connection_limit, unsigned int idle_timeout_seconds,
              size_t connection_memory_limit, int *start_errno) {
    // MHD_USE_ITC: a resume, or the stop, wakes the thread through it (without it the stop
    // would shut the listening socket down).
    // MHD_ALLOW_UPGRADE: a lease takes over its connection after a 101 (HTTP/1.1 only).
    // MHD_ALLOW_SUSPEND_RESUME: an event stream waits for events with its connection suspended.
    unsigned int flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_USE_ITC | MHD_USE_ERROR_LOG
        | MHD_ALLOW_UPGRADE | MHD_ALLOW_SUSPEND_RESUME;
    errno = 0;
    struct MHD_Daemon *d = MHD_start_daemon(flags, 0, NULL, NULL, handler, handler_cls,
                            MHD_OPTION_LISTEN_SOCKET, (MHD_socket)listen_fd,
                            MHD_OPTION_NOTIFY_COMPLETED, completed, completed_cls,
                            MHD_OPTION_NOTIFY_CONNECTION, notify, notify_cls,
                            MHD_OPTION_CONNECTION_LIMIT, connection_limit,
                            MHD_OPTION_CONNECTION_TIMEOUT, idle_timeout_seconds,
                            MHD_OPTION_CONNECTION_MEMORY_LIMIT, connection_memory_limit,
                            MHD_OPTION_END);
    // MHD logs why it refused on stderr; the errno it left (if any) travels with the error.
    if (d == NULL) *start_errno = errno;
    return d;
}

// A response whose body MHD copies before returning (MHD_RESPMEM_MUST_COPY).
static inline struct MHD_Response *mqt_mhd_response_copy(size_t size, const void *data) {
    return MHD_create_response_from_buffer(size, (void *)data, MHD_RESPMEM_MUST_COPY);
}

// A streamed response of unknown length (chunked), read through `reader` in blocks of up to
// `block` bytes; `done` runs when MHD no longer needs it.
static inline struct MHD_Response *mqt_mhd_response_stream(size_t block, MHD_ContentReaderCallback reader,
                                                           void *cls, MHD_ContentReaderFreeCallback done) {
    return MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, block, reader, cls, done);
}

// MHD_get_connection_info is variadic: the connection's socket, or -1.
static inline int mqt_mhd_connection_fd(struct MHD_Connection *c) {
    const union MHD_ConnectionInfo *info = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    return info == NULL ? -1 : info->connect_fd;
}

// Framing headers as they came, for the checks MHD does not make: how many Content-Length
// headers, whether their values differ, and whether Transfer-Encoding is there too.
struct mqt_framing {
    int content_lengths;
    int lengths_differ;
    int transfer_encoding;
    const char *first_length;
};

static enum MHD_Result mqt_framing_header(void *cls, enum MHD_ValueKind kind, const char *key, const char *value) {
    (void)kind;
    struct mqt_framing *f = (struct mqt_framing *)cls;
    if (strcasecmp(key, "Content-Length") == 0) {
        if (f->content_lengths++ == 0) f->first_length = value;
        else if (value == NULL || f->first_length == NULL || strcmp(value, f->first_length) != 0) f->lengths_differ = 1;
    } else if (strcasecmp(key, "Transfer-Encoding") == 0) {
        f->transfer_encoding = 1;
    }
    return MHD_YES;
}

static inline struct mqt_framing mqt_mhd_framing(struct MHD_Connection *c) {
    struct mqt_framing f = {0, 0, 0, NULL};
    MHD_get_connection_values(c, MHD_HEADER_KIND, mqt_framing_header, &f);
    return f;
}

// MHD_get_connection_info is variadic: what the NOTIFY_CONNECTION callback stored for the
// connection when it started, or NULL.
static inline void *mqt_mhd_socket_context(struct MHD_Connection *c) {
    const union MHD_ConnectionInfo *info = MHD_get_connection_info(c, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    return info == NULL ? NULL : info->socket_context;
}

// MHD_upgrade_action is variadic: closes an upgraded connection (MHD closes the socket and
// frees `urh` on its own thread afterwards; neither may be used again).
static inline enum MHD_Result mqt_mhd_upgrade_close(struct MHD_UpgradeResponseHandle *urh) {
    return MHD_upgrade_action(urh, MHD_UPGRADE_ACTION_CLOSE);
}

#endif
