import Foundation
import Testing

@testable import TunnelCrypto

struct PrimitiveTests {
    @Test func blake2bMatchesReference() {
        var out = [UInt8](repeating: 0, count: 64)
        let input = Array("abc".utf8)
        out.withUnsafeMutableBytes { o in input.withUnsafeBytes { Blake2b.hash([$0], into: o.baseAddress!) } }
        #expect(
            toHex(out)
                == "ba80a53f981c4d0d6a2797b69f12f6e94c212f14685ac4b74b12bb6fdbffa2d17d87c5392aab792dc252d5de4533cc9518d38aa8dbf1925ab92386edd4009923"
        )
    }

    /// Reference: Python `hmac.new(b"key", msg, hashlib.blake2b)`.
    @Test func hmacBlake2bMatchesPython() {
        var out = [UInt8](repeating: 0, count: 64)
        let key = Array("key".utf8)
        let message = Array("The quick brown fox jumps over the lazy dog".utf8)
        out.withUnsafeMutableBytes { o in
            key.withUnsafeBytes { k in
                message.withUnsafeBytes { m in Blake2b.hmac(key: k, data: [m], into: o.baseAddress!) }
            }
        }
        #expect(
            toHex(out)
                == "92294f92c0dfb9b00ec9ae8bd94d7e7d8a036b885a499f149dfe2fd2199394aaaf6b8894a1730cccb2cd050f9bcf5062a38b51b0dab33207f8ef35ae2c9df51b"
        )
    }

    @Test func base64RoundTripsAndRejectsJunk() {
        for length in 0..<40 {
            let bytes = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) }
            let encoded = Base64.encode(bytes)
            #expect(Base64.decode(encoded) == bytes)
            #expect(encoded == Data(bytes).base64EncodedString())
        }
        for junk in [
            "abc", "ab=c", "a===", "@@@@", "AAAA=AAA", "AA=A", "AB==", "AAB=", "QQ== ", " QQ==", "QQ==QQ==", "QQ\n==",
        ] {
            #expect(Base64.decode(junk) == nil, "\(junk)")
        }
        // Trailing bits must be zero (one canonical spelling per value): "QR==" would also mean "A".
        #expect(Base64.decode("QQ==") == Array("A".utf8))
        #expect(Base64.decode("QR==") == nil)
        // HTTP Basic may leave the padding off; a strict key decode may not.
        #expect(Base64.decode(bytes: Array("YWxpY2U6cw".utf8), paddingOptional: true) == Array("alice:s".utf8))
        #expect(Base64.decode(bytes: Array("YWxpY2U6cw".utf8)) == nil)
        #expect(Base64.decode(bytes: Array("YWxpY2U6cw==".utf8), paddingOptional: true) == Array("alice:s".utf8))
        #expect(Base64.decode(bytes: Array("YWxpY2U6cw=".utf8), paddingOptional: true) == nil)
    }

    @Test func publicKeyParsing() {
        let key = PrivateKey().publicKey
        #expect(PublicKey(base64: key.base64) == key)
        #expect(PublicKey(base64: "AAAA") == nil)
        #expect(PublicKey(base64: String(key.base64.dropLast())) == nil)
    }

    @Test func rekeyChangesKeyButKeepsNonce() {
        let key = SecretBytes.random(count: 32)
        var a = CipherState(cipher: .chaChaPoly, key: key)
        var b = CipherState(cipher: .chaChaPoly, key: key)
        a.rekey()
        b.rekey()
        var buffer = [UInt8](repeating: 0x42, count: 100 + 16)
        buffer.withUnsafeMutableBytes { a.sealInPlace($0.baseAddress!, count: 100) }
        var out = [UInt8](repeating: 0, count: 100)
        let ok = out.withUnsafeMutableBytes { o in
            buffer.withUnsafeBytes { b.open($0.baseAddress!, count: $0.count, into: o.baseAddress!) }
        }
        #expect(ok)
        #expect(out == [UInt8](repeating: 0x42, count: 100))
        var stale = CipherState(cipher: .chaChaPoly, key: key)
        buffer = [UInt8](repeating: 0x42, count: 116)
        buffer.withUnsafeMutableBytes { a.sealInPlace($0.baseAddress!, count: 100) }
        let staleOK = out.withUnsafeMutableBytes { o in
            buffer.withUnsafeBytes { stale.open($0.baseAddress!, count: $0.count, into: o.baseAddress!) }
        }
        #expect(!staleOK)
        #expect(stale.nonce == 0, "a failed open must not advance the nonce")
    }

    @Test func tai64nOrdersAndRoundTrips() {
        let earlier = TAI64N(unixNanoseconds: 1_700_000_000_000_000_000)
        let later = TAI64N(unixNanoseconds: 1_700_000_001_000_000_000)
        #expect(earlier < later)
        #expect(TAI64N(bytes: later.bytes) == later)
        #expect(TAI64N(bytes: [1, 2, 3]) == nil)
    }
}
