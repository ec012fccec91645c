import NIOCore
import Testing
import TunnelProtocol

@testable import LocalProxy

struct SOCKS5AuthenticationTests {
    let credentials = ProxyCredentials(username: "alice", password: "s3cret")

    func run(_ machine: inout SOCKS5ServerStateMachine, _ bytes: [UInt8]) -> [SOCKS5ServerStateMachine.Action] {
        var buffer = ByteBuffer(bytes: bytes)
        var actions: [SOCKS5ServerStateMachine.Action] = []
        while true {
            let action = machine.receive(&buffer)
            actions.append(action)
            if case .send = action { continue }
            return actions
        }
    }

    func auth(_ user: String, _ pass: String) -> [UInt8] {
        [0x01, UInt8(user.utf8.count)] + Array(user.utf8) + [UInt8(pass.utf8.count)] + Array(pass.utf8)
    }

    @Test func rightCredentialsThenRequest() {
        var machine = SOCKS5ServerStateMachine(credentials: self.credentials)
        let actions = self.run(
            &machine,
            [0x05, 0x02, 0x00, 0x02] + self.auth("alice", "s3cret") + [0x05, 0x01, 0x00, 0x01, 1, 2, 3, 4, 0, 80]
        )
        #expect(
            actions == [
                .send(ByteBuffer(bytes: [0x05, 0x02])), .send(ByteBuffer(bytes: [0x01, 0x00])),
                .request(.connect(TargetAddress(host: .ipv4(0x0102_0304), port: 80))),
            ]
        )
    }

    @Test(arguments: [("alice", "wrong"), ("bob", "s3cret"), ("alic", "s3cret"), ("", "")])
    func wrongCredentialsFailWithStatus(user: String, pass: String) {
        var machine = SOCKS5ServerStateMachine(credentials: self.credentials)
        let actions = self.run(&machine, [0x05, 0x01, 0x02] + self.auth(user, pass))
        guard case .replyAndClose(let bytes, _) = actions.last else {
            Issue.record("\(actions)")
            return
        }
        #expect(Array(bytes.readableBytesView) == [0x01, 0x01])
    }

    @Test func onlyUsernamePasswordIsOfferedWhenRequired() {
        var machine = SOCKS5ServerStateMachine(credentials: self.credentials)
        guard case .replyAndClose(let bytes, _) = self.run(&machine, [0x05, 0x01, 0x00]).last else {
            Issue.record()
            return
        }
        #expect(Array(bytes.readableBytesView) == [0x05, 0xFF])
    }

    @Test func credentialsSplitAcrossReads() {
        var machine = SOCKS5ServerStateMachine(credentials: self.credentials)
        var buffer = ByteBuffer(bytes: [0x05, 0x01, 0x02])
        _ = machine.receive(&buffer)
        let all = self.auth("alice", "s3cret")
        for byte in all.dropLast() {
            buffer.writeInteger(byte)
            #expect(machine.receive(&buffer) == .needMoreData)
        }
        buffer.writeInteger(all.last!)
        #expect(machine.receive(&buffer) == .send(ByteBuffer(bytes: [0x01, 0x00])))
    }

    @Test func udpAssociateIsARequest() {
        var machine = SOCKS5ServerStateMachine()
        let actions = self.run(&machine, [0x05, 0x01, 0x00, 0x05, 0x03, 0x00, 0x01, 0, 0, 0, 0, 0, 0])
        #expect(actions.last == .request(.udpAssociate(TargetAddress(host: .ipv4(0), port: 0))))
    }
}

struct SOCKS4Tests {
    func run(_ bytes: [UInt8], credentials: ProxyCredentials? = nil) -> (SOCKS4ServerStateMachine.Action, ByteBuffer) {
        var machine = SOCKS4ServerStateMachine(credentials: credentials)
        var buffer = ByteBuffer(bytes: bytes)
        return (machine.receive(&buffer), buffer)
    }

    @Test func socks4ConnectByAddress() {
        let (action, rest) = self.run(
            [0x04, 0x01, 0x00, 0x50, 10, 0, 0, 1] + Array("user".utf8) + [0] + Array("early".utf8)
        )
        #expect(action == .request(.connect(TargetAddress(host: .ipv4(0x0A00_0001), port: 80))))
        #expect(String(buffer: rest) == "early")
    }

    @Test func socks4aConnectByName() {
        let (action, _) = self.run([0x04, 0x01, 0x01, 0xBB, 0, 0, 0, 1, 0] + Array("example.com".utf8) + [0])
        #expect(action == .request(.connect(TargetAddress(host: .domain("example.com"), port: 443))))
    }

    @Test func partialRequestsWait() {
        let full: [UInt8] = [0x04, 0x01, 0x01, 0xBB, 0, 0, 0, 1] + Array("id".utf8) + [0] + Array("host".utf8) + [0]
        for cut in 1..<full.count {
            var machine = SOCKS4ServerStateMachine()
            var buffer = ByteBuffer(bytes: full[..<cut])
            #expect(machine.receive(&buffer) == .needMoreData, "cut at \(cut)")
            #expect(buffer.readerIndex == 0)
        }
    }

    @Test func bindIsRejected() {
        let (action, _) = self.run([0x04, 0x02, 0x00, 0x50, 10, 0, 0, 1, 0])
        guard case .replyAndClose(let bytes, _) = action else {
            Issue.record("\(action)")
            return
        }
        #expect(Array(bytes.readableBytesView) == [0, 0x5B, 0, 0, 0, 0, 0, 0])
    }

    @Test func userIDMustCarryNameAndPasswordWhenCredentialsAreSet() {
        let credentials = ProxyCredentials(username: "alice", password: "x")
        let (ok, _) = self.run(
            [0x04, 0x01, 0x00, 0x50, 10, 0, 0, 1] + Array("alice:x".utf8) + [0],
            credentials: credentials
        )
        #expect(ok == .request(.connect(TargetAddress(host: .ipv4(0x0A00_0001), port: 80))))
        for userID in ["alice", "bob", "alice:", "alice:y", "alice:xx", ":x", ""] {
            let (bad, reply) = self.run(
                [0x04, 0x01, 0x00, 0x50, 10, 0, 0, 1] + Array(userID.utf8) + [0],
                credentials: credentials
            )
            guard case .replyAndClose(let bytes, _) = bad else {
                Issue.record("\(userID): \(bad)")
                continue
            }
            #expect(Array(bytes.readableBytesView) == [0, 0x5B, 0, 0, 0, 0, 0, 0], "\(userID)")
            _ = reply
        }
    }

    @Test func overlongFieldsAreRefused() {
        let (action, _) = self.run([0x04, 0x01, 0x00, 0x50, 10, 0, 0, 1] + [UInt8](repeating: 0x61, count: 300))
        guard case .replyAndClose = action else {
            Issue.record("\(action)")
            return
        }
    }

    @Test func replyEncoding() {
        #expect(
            Array(
                SOCKS4.reply(.succeeded, bound: TargetAddress(host: .ipv4(0x7F00_0001), port: 8080)).readableBytesView
            )
                == [0, 0x5A, 0x1F, 0x90, 127, 0, 0, 1]
        )
        #expect(Array(SOCKS4.reply(.connectionRefused).readableBytesView) == [0, 0x5B, 0, 0, 0, 0, 0, 0])
    }

    @Test func protocolDetection() {
        #expect(LocalProxyProtocol.detect(firstByte: 0x05) == .socks5)
        #expect(LocalProxyProtocol.detect(firstByte: 0x04) == .socks4)
        #expect(LocalProxyProtocol.detect(firstByte: UInt8(ascii: "G")) == .http)
        #expect(LocalProxyProtocol.detect(firstByte: UInt8(ascii: "C")) == .http)
        #expect(LocalProxyProtocol.detect(firstByte: 0x16) == nil)  // TLS
        #expect(LocalProxyProtocol.detect(firstByte: UInt8(ascii: "g")) == nil)
    }
}

struct SOCKS5UDPTests {
    @Test func applicationDatagramBecomesTunnelPayloadAndBack() throws {
        let datagram = ByteBuffer(bytes: [0, 0, 0, 0x01, 10, 0, 0, 1, 0, 53] + Array("query".utf8))
        let payload = try SOCKS5UDP.tunnelPayload(fromApplication: datagram).get()
        #expect(Array(payload.readableBytesView) == [0x01, 10, 0, 0, 1, 0, 53] + Array("query".utf8))
        let (address, data) = try #require(SOCKS5UDP.split(payload))
        #expect(address == TargetAddress(host: .ipv4(0x0A00_0001), port: 53))
        #expect(String(buffer: data) == "query")
        let back = SOCKS5UDP.applicationDatagram(fromTunnel: payload, allocator: ByteBufferAllocator())
        #expect(back == datagram)
    }

    @Test func dropsFragmentsReservedBitsAndGarbage() {
        #expect(
            SOCKS5UDP.tunnelPayload(fromApplication: ByteBuffer(bytes: [0, 0, 1, 0x01, 1, 2, 3, 4, 0, 1]))
                == .failure(.fragmented)
        )
        #expect(
            SOCKS5UDP.tunnelPayload(fromApplication: ByteBuffer(bytes: [0, 1, 0, 0x01, 1, 2, 3, 4, 0, 1]))
                == .failure(.reserved)
        )
        #expect(
            SOCKS5UDP.tunnelPayload(fromApplication: ByteBuffer(bytes: [0, 0, 0, 0x09, 1, 2, 3, 4, 0, 1]))
                == .failure(.badAddress)
        )
        #expect(SOCKS5UDP.tunnelPayload(fromApplication: ByteBuffer(bytes: [0, 0, 0])) == .failure(.truncated))
        #expect(
            SOCKS5UDP.tunnelPayload(fromApplication: ByteBuffer(bytes: [0, 0, 0, 0x03, 20, 0x61, 0x61, 0x61, 0, 1]))
                == .failure(.truncated)
        )
    }
}
