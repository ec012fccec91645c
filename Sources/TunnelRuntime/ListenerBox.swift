import NIOConcurrencyHelpers
import NIOCore

/// The listening channel, set once bound and taken at shutdown.
package final class NIOLockedValueBoxChannel: Sendable {
    private let box = NIOLockedValueBox<(any Channel)?>(nil)
    package init() {}
    package func set(_ channel: any Channel) { self.box.withLockedValue { $0 = channel } }
    package var current: (any Channel)? { self.box.withLockedValue { $0 } }
    package func take() -> (any Channel)? {
        self.box.withLockedValue { value in
            defer { value = nil }
            return value
        }
    }
}
