import LocalProxy
import NIOCore
import Testing
import TunnelProtocol

struct FastOpenCacheTests {
    static func target(_ port: Int, host: String = "example.com") -> TargetAddress {
        TargetAddress(host: .domain(host), port: UInt16(port))
    }
    static let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000)

    @Test func aDestinationIsKnownAfterASuccessAndForgottenAfterItsLifetime() {
        var cache = FastOpenCache(capacity: 10, lifetime: .minutes(10))
        #expect(!cache.contains(Self.target(443), now: Self.t0), "first contact")
        cache.succeeded(Self.target(443), now: Self.t0)
        #expect(cache.contains(Self.target(443), now: Self.t0 + .minutes(9)))
        #expect(!cache.contains(Self.target(80), now: Self.t0), "another port is another destination")
        #expect(!cache.contains(Self.target(443, host: "example.org"), now: Self.t0))
        #expect(!cache.contains(Self.target(443), now: Self.t0 + .minutes(10)), "expired")
    }

    @Test func aNewSuccessRenewsTheLifetime() {
        var cache = FastOpenCache(capacity: 10, lifetime: .minutes(10))
        cache.succeeded(Self.target(443), now: Self.t0)
        cache.succeeded(Self.target(443), now: Self.t0 + .minutes(8))
        #expect(cache.contains(Self.target(443), now: Self.t0 + .minutes(17)))
    }

    @Test func aFailureForgetsTheDestination() {
        var cache = FastOpenCache(capacity: 10, lifetime: .minutes(10))
        cache.succeeded(Self.target(443), now: Self.t0)
        cache.failed(Self.target(443))
        #expect(!cache.contains(Self.target(443), now: Self.t0))
        cache.failed(Self.target(8443))  // unknown: nothing happens
        cache.succeeded(Self.target(443), now: Self.t0 + .seconds(1))
        #expect(cache.contains(Self.target(443), now: Self.t0 + .seconds(2)), "a later success counts again")
    }

    @Test func theCacheIsBoundedAndTheLongestUnusedLeavesFirst() {
        var cache = FastOpenCache(capacity: 3, lifetime: .minutes(10))
        for port in 1...3 { cache.succeeded(Self.target(port), now: Self.t0 + .seconds(Int64(port))) }
        cache.succeeded(Self.target(1), now: Self.t0 + .seconds(4))  // 1 is the most recent now
        cache.succeeded(Self.target(4), now: Self.t0 + .seconds(5))
        #expect(cache.count == 3)
        let now = Self.t0 + .seconds(6)
        #expect(!cache.contains(Self.target(2), now: now), "the oldest success left")
        #expect(cache.contains(Self.target(1), now: now) && cache.contains(Self.target(3), now: now))
        #expect(cache.contains(Self.target(4), now: now))
    }

    @Test func manySuccessesOfTheSameDestinationsKeepMemoryBounded() {
        var cache = FastOpenCache(capacity: 4, lifetime: .minutes(10))
        for i in 0..<10_000 { cache.succeeded(Self.target(i % 4), now: Self.t0 + .milliseconds(Int64(i))) }
        #expect(cache.count == 4)
        for i in 0..<10_000 { cache.succeeded(Self.target(1000 + i), now: Self.t0 + .seconds(20 + Int64(i))) }
        #expect(cache.count == 4)
        #expect(cache.contains(Self.target(10_999), now: Self.t0 + .seconds(20 + 10_000)))
    }
}
