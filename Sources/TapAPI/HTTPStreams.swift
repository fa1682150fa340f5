import Synchronization
import TunKit

/// A streamed response in flight: its body, its connection (suspended while the body has
/// nothing to give), and whether it is suspended. Retained for MHD while MHD sends it
/// (MHD.swift), and `finished()` once MHD no longer needs it.
final class Streaming: Sendable {
    let body: any StreamBody
    // The connection is suspended only from MHD's reader callback and resumed from anywhere,
    // both under `state`'s lock, so a resume never comes for a connection that is not
    // suspended (which MHD forbids).
    private let connection: MHDConnection
    private struct State {
        var suspended = false
        /// A wake came since the reader last looked.
        var pending = false
        var done = false
    }
    private let state = Mutex(State())
    private weak let registry: Streams?

    init(_ body: any StreamBody, _ connection: MHDConnection, _ registry: Streams) {
        self.body = body
        self.connection = connection
        self.registry = registry
    }

    /// Called by the body's producer: resumes the connection if it waits.
    func wake() {
        state.withLock { s in
            s.pending = true
            if s.suspended && !s.done {
                s.suspended = false
                connection.resume()
            }
        }
    }

    /// On MHD's thread, in the reader callback; `.waiting` leaves the connection suspended
    /// until the next `wake`.
    func read(_ buffer: UnsafeMutableRawBufferPointer) -> StreamRead {
        state.withLock { $0.pending = false }
        let r = body.read(into: buffer)
        guard r == .waiting else { return r }
        state.withLock { s in
            // A wake between the read and here: look again instead of sleeping.
            if s.pending || s.done { return }
            s.suspended = true
            connection.suspend()
        }
        return .waiting
    }

    /// MHD is done with the response (the client went, or the body ended).
    func finished() {
        state.withLock { $0.done = true }
        body.close()
        registry?.remove(self)
    }
}

/// The streams in flight, ended before MHD stops (MHD must not stop with a suspended
/// connection).
final class Streams: Sendable {
    private struct State {
        var open: [ObjectIdentifier: Streaming] = [:]
        var stopping = false
    }
    private let state = Monitor(State())

    /// Registers a stream; once the server stops, a new one is finished at once (its
    /// first read ends it), so no connection is ever suspended when MHD stops.
    func add(_ s: Streaming) {
        let stopping = state.withLock { st in
            st.open[ObjectIdentifier(s)] = s
            return st.stopping
        }
        if stopping { s.body.finish() }
    }

    func remove(_ s: Streaming) { state.withLock { _ = $0.open.removeValue(forKey: ObjectIdentifier(s)) } }

    /// Ends every stream (and any that comes later) and waits (up to `seconds`) for MHD to
    /// send their last chunk.
    func finishAll(within seconds: Double) {
        let all = state.withLock { st in
            st.stopping = true
            return Array(st.open.values)
        }
        for s in all {
            s.body.finish()
            s.wake()
        }
        state.wait(until: { $0.open.isEmpty }, within: seconds)
    }
}
