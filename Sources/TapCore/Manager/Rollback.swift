/// The undo steps of a change in progress: each step that succeeds registers how to undo
/// itself; if a later step fails, they run in reverse; if the change succeeds, they are
/// dropped. The one way a half-done create, join, add-queue, restore or patch is undone.
struct Rollback {
    private var undos: [() -> Void] = []

    /// Registers how to undo the step that just succeeded.
    mutating func add(_ undo: @escaping () -> Void) { undos.append(undo) }

    fileprivate func run() {
        for undo in undos.reversed() { undo() }
    }
}

/// Runs `body` with a fresh rollback: on a throw, every undo it registered runs in reverse
/// and the error goes on; on success they are dropped.
func withRollback<T>(_ body: (inout Rollback) throws(ManagerError) -> T) throws(ManagerError) -> T {
    var rollback = Rollback()
    do {
        return try body(&rollback)
    } catch {
        rollback.run()
        throw error
    }
}
