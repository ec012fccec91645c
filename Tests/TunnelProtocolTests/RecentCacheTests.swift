import NIOCore
import Testing
import TunnelProtocol

/// The cache under the client's fast-open destinations (see also FastOpenCacheTests) and the server's
/// resolved names.
struct RecentCacheTests {
    static let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000)

    @Test func aValueIsReturnedWithinItsLifetimeAndReplacedByANewerOne() {
        var cache = RecentCache<String, [Int]>(capacity: 4, lifetime: .seconds(30))
        #expect(cache.value(for: "example.com", now: Self.t0) == nil)
        cache.store([1, 2], for: "example.com", now: Self.t0)
        #expect(cache.value(for: "example.com", now: Self.t0 + .seconds(29)) == [1, 2])
        #expect(cache.value(for: "example.com", now: Self.t0 + .seconds(30)) == nil, "expired")
        cache.store([3], for: "example.com", now: Self.t0 + .seconds(31))
        #expect(cache.value(for: "example.com", now: Self.t0 + .seconds(40)) == [3])
        #expect(cache.count == 1)
        cache.remove("example.com")
        #expect(cache.value(for: "example.com", now: Self.t0 + .seconds(40)) == nil)
        #expect(cache.count == 0)
    }

    @Test func theKeyStoredLongestAgoLeavesFirstAndMemoryStaysBounded() {
        var cache = RecentCache<Int, Int>(capacity: 3, lifetime: .minutes(1))
        for key in 1...3 { cache.store(key * 10, for: key, now: Self.t0 + .milliseconds(Int64(key))) }
        cache.store(11, for: 1, now: Self.t0 + .milliseconds(4))  // 1 is the most recent now
        cache.store(40, for: 4, now: Self.t0 + .milliseconds(5))
        let now = Self.t0 + .milliseconds(6)
        #expect(cache.value(for: 2, now: now) == nil, "stored longest ago")
        #expect(cache.value(for: 1, now: now) == 11 && cache.value(for: 3, now: now) == 30)
        #expect(cache.value(for: 4, now: now) == 40)
        for i in 0..<10_000 { cache.store(i, for: i % 5, now: Self.t0 + .milliseconds(10 + Int64(i))) }
        #expect(cache.count == 3)
    }
}
