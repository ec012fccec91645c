/// The event loop's scheduled work: the earliest deadline first, ties in the order scheduled, and cancellation
/// that frees the work at once (a connection's time limit, cancelled when the connection ends, must not keep
/// the connection's objects alive until the limit would have passed).
///
/// A min-heap of (deadline, id) and a table from id to the work. Cancelling removes the table's entry; its
/// heap entry stays until it comes up (16 bytes) or until stale entries outnumber live ones, when the heap is
/// rebuilt from the table.
struct TimerQueue<Work> {
    private struct Entry {
        var deadline: UInt64
        var id: UInt64
        func precedes(_ other: Entry) -> Bool {
            self.deadline < other.deadline || (self.deadline == other.deadline && self.id < other.id)
        }
    }

    private var heap: [Entry] = []
    private var work: [UInt64: (deadline: UInt64, work: Work)] = [:]
    private var nextID: UInt64 = 0

    var isEmpty: Bool { self.work.isEmpty }
    var count: Int { self.work.count }

    /// Adds `work` due at `deadline` (nanoseconds on the loop's clock); returns its id for `cancel`.
    mutating func schedule(_ work: Work, at deadline: UInt64) -> UInt64 {
        let id = self.nextID
        self.nextID &+= 1
        self.work[id] = (deadline, work)
        self.push(Entry(deadline: deadline, id: id))
        return id
    }

    /// Ids from here up are the caller's (`schedule(_:at:id:)`); below, the queue's own.
    static var externalIDs: UInt64 { 1 << 63 }

    /// Adds `work` due at `deadline` under an id the caller chose, at or above `externalIDs` and unused.
    mutating func schedule(_ work: Work, at deadline: UInt64, id: UInt64) -> UInt64 {
        precondition(id >= Self.externalIDs && self.work[id] == nil)
        self.work[id] = (deadline, work)
        self.push(Entry(deadline: deadline, id: id))
        return id
    }

    /// Removes the work of `id` and returns it, or nil when it already ran or was cancelled.
    mutating func cancel(_ id: UInt64) -> Work? {
        guard let removed = self.work.removeValue(forKey: id) else { return nil }
        if self.heap.count > 64 && self.heap.count > 2 * self.work.count { self.rebuild() }
        return removed.work
    }

    /// The earliest deadline still pending.
    mutating func nextDeadline() -> UInt64? {
        self.dropStale()
        return self.heap.first?.deadline
    }

    /// The earliest work due at or before `now`, taken out of the queue.
    mutating func popDue(now: UInt64) -> Work? {
        self.dropStale()
        guard let first = self.heap.first, first.deadline <= now else { return nil }
        self.popFirst()
        return self.work.removeValue(forKey: first.id)?.work
    }

    /// Takes out every pending work (the loop is shutting down).
    mutating func removeAll() -> [Work] {
        let all = self.work.sorted { $0.key < $1.key }.map(\.value.work)
        self.work.removeAll()
        self.heap.removeAll()
        return all
    }

    private mutating func dropStale() {
        while let first = self.heap.first, self.work[first.id] == nil { self.popFirst() }
    }

    private mutating func rebuild() {
        self.heap = self.work.map { Entry(deadline: $0.value.deadline, id: $0.key) }
        var index = self.heap.count / 2
        while index > 0 {
            index -= 1
            self.siftDown(index)
        }
    }

    private mutating func push(_ entry: Entry) {
        self.heap.append(entry)
        var child = self.heap.count - 1
        while child > 0 {
            let parent = (child - 1) / 2
            guard self.heap[child].precedes(self.heap[parent]) else { break }
            self.heap.swapAt(child, parent)
            child = parent
        }
    }

    private mutating func popFirst() {
        let last = self.heap.removeLast()
        guard !self.heap.isEmpty else { return }
        self.heap[0] = last
        self.siftDown(0)
    }

    private mutating func siftDown(_ start: Int) {
        var parent = start
        let count = self.heap.count
        while true {
            let left = 2 * parent + 1
            guard left < count else { return }
            var smallest = left
            if left + 1 < count && self.heap[left + 1].precedes(self.heap[left]) { smallest = left + 1 }
            guard self.heap[smallest].precedes(self.heap[parent]) else { return }
            self.heap.swapAt(smallest, parent)
            parent = smallest
        }
    }
}
