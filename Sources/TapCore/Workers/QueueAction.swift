/// What a worker does with each frame it reads from a queue. A new way of handling frames is
/// one new case here and one arm in `Worker.readOne`.
enum QueueAction: Sendable {
    /// Count and drop.
    case sink
    /// Write the frame back into the queue it came from. `macOffset` is where the Ethernet
    /// header starts (after a vnet header, if any), so the addresses can be swapped and the
    /// frame goes back to its sender; nil for TUN, whose frames have no MAC addresses.
    case echo(macOffset: Int?)
    /// Write the frame, unchanged, into the peer's queue with the same index modulo the
    /// peer's queue count (a flow stays on one queue pair).
    case forward(ForwardTarget)

    /// `sizeof(struct virtio_net_hdr)`, the kernel's default vnet header size.
    static let vnetHeaderSize = 10

    /// The action for a device's mode; `target` for `forward`.
    static func of(_ mode: DeviceMode, kind: DeviceKind, vnetHdr: Bool, target: ForwardTarget?) -> QueueAction {
        switch mode {
        // An external device's queues are never polled; sink is what a stray read would do.
        case .sink, .external: return .sink
        case .echo: return .echo(macOffset: kind == .tap ? (vnetHdr ? vnetHeaderSize : 0) : nil)
        case .forward: return .forward(target ?? ForwardTarget([]))
        }
    }
}
