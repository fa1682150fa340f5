#ifndef MQTAPD_CMICROHTTPD_SHIM_H
#define MQTAPD_CMICROHTTPD_SHIM_H
#include <stdarg.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <microhttpd.h>

// MHD_start_daemon is variadic, which Swift cannot call: every option goes through one
// MHD_OPTION_ARRAY instead, terminated by an MHD_OPTION_END entry the caller provides.
static inline struct MHD_Daemon *
mqt_mhd_start(unsigned int flags, uint16_t port,
              MHD_AccessHandlerCallback handler, void *handler_cls,
              struct MHD_OptionItem *options) {
    return MHD_start_daemon(flags, port, NULL, NULL, handler, handler_cls,
                            MHD_OPTION_ARRAY, options, MHD_OPTION_END);
}

// MHD_get_daemon_info is variadic too; this reads the listen socket's fd.
static inline int mqt_mhd_listen_fd(struct MHD_Daemon *d) {
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(d, MHD_DAEMON_INFO_LISTEN_FD);
    return info ? info->listen_fd : -1;
}
#endif
