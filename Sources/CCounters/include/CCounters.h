#ifndef MQTAPD_CCOUNTERS_H
#define MQTAPD_CCOUNTERS_H
#include <stdint.h>

// One queue's counters: two cache lines, one for each kind of writer, so no two cores ever
// write the same line.
// - The first line is the queue's own worker's alone: what it read, its errors, what it could
//   not forward. One writer and any number of lock-free readers: a relaxed load + relaxed
//   store is enough (no read-modify-write), and readers see every value whole (64-bit aligned
//   atomics never tear).
// - The second counts what is written into the queue, by whoever writes it: its own worker
//   echoing, and other devices' workers forwarding into it, on other cores. Atomic adds.
//   Before the split, a forwarder's add on a peer's tx pulled the line the peer's worker was
//   writing rx on away from it at every frame.
// Swift has no portable way to lay out aligned storage with relaxed atomics on it without
// an extra package; these few lines of C do it.
typedef struct mqt_counters {
    // Line 1: the queue's worker alone.
    uint64_t rx_packets;
    uint64_t rx_bytes;
    uint64_t rx_errors;
    // Echo writes that failed (only the queue's own worker writes into it in echo mode).
    uint64_t tx_errors;
    // Frames read from this queue that could not be forwarded (no peer queue, or the write
    // failed).
    uint64_t dropped;
    // Padding to the line's end (Swift does not import over-aligned C types, so the 64-byte
    // alignment is asked for at allocation instead).
    uint64_t reserved_own[3];
    // Line 2: every writer into the queue.
    uint64_t tx_packets;
    uint64_t tx_bytes;
    uint64_t reserved_shared[6];
} mqt_counters;

_Static_assert(sizeof(mqt_counters) == 128, "two cache lines per counter block");
_Static_assert(__builtin_offsetof(mqt_counters, tx_packets) == 64, "the shared fields start the second line");

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
