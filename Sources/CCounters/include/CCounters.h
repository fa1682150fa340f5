#ifndef MQTAPD_CCOUNTERS_H
#define MQTAPD_CCOUNTERS_H
#include <stdint.h>

// One queue's counters, alone on a cache line so two workers never write the same line.
// Each field has one writer (the queue's worker) and any number of lock-free readers, so a
// relaxed load + relaxed store is enough for the writer (no read-modify-write needed), and
// readers see every value whole (64-bit aligned atomics never tear).
// Swift has no portable way to lay out aligned storage with relaxed atomics on it without
// an extra package; these few lines of C do it.
typedef struct mqt_counters {
    uint64_t rx_packets;
    uint64_t rx_bytes;
    uint64_t tx_packets;
    uint64_t tx_bytes;
    uint64_t rx_errors;
    uint64_t tx_errors;
    // Frames read from this queue that could not be forwarded (no peer queue, or the write
    // failed).
    uint64_t dropped;
    // Padding to a full cache line (Swift does not import over-aligned C types, so the
    // 64-byte alignment is asked for at allocation instead).
    uint64_t reserved[1];
} mqt_counters;

_Static_assert(sizeof(mqt_counters) == 64, "one counter block per cache line");

static inline void mqt_counter_add(uint64_t *field, uint64_t delta) {
    __atomic_store_n(field, __atomic_load_n(field, __ATOMIC_RELAXED) + delta, __ATOMIC_RELAXED);
}

// For the fields more than one worker adds to (a queue's tx counters: its own worker echoes
// into it, forwarding workers of other devices write into it): an atomic read-modify-write.
static inline void mqt_counter_add_shared(uint64_t *field, uint64_t delta) {
    __atomic_fetch_add(field, delta, __ATOMIC_RELAXED);
}

static inline uint64_t mqt_counter_load(const uint64_t *field) {
    return __atomic_load_n(field, __ATOMIC_RELAXED);
}
#endif
