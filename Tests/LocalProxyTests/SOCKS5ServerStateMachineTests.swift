import NIOCore
import Testing
import TunnelProtocol

@testable import LocalProxy

struct SOCKS5ServerStateMachineTests {
    func run(_ chunks: [[UInt8]]) -> (actions: [SOCKS5ServerStateMachine.Action], rest: ByteBuffer) {
        var machine = SOCKS5ServerStateMachine()
        var buffer = ByteBuffer()
        var actions: [SOCKS5ServerStateMachine.Action] = []
        for chunk in chunks {
            buffer.writeBytes(chunk)
            while true {
                let action = machine.receive(&buffer)
                actions.append(action)
                if case .send = action { continue }
                break
            }
        }
        return (actions, buffer)
    }

    let greeting: [UInt8] = [0x05, 0x01, 0x00]
    func request(_ atyp: UInt8, _ addr: [UInt8], port: UInt16 = 443, command: UInt8 = 0x01) -> [UInt8] {
        [0x05, command, 0x00, atyp] + addr + [UInt8(port >> 8), UInt8(port & 0xFF)]
    }

    @Test func connectWithEachAddressType() {
        let cases: [([UInt8], [UInt8], TargetAddress)] = [
            ([0x01], [127, 0, 0, 1], TargetAddress(host: .ipv4(0x7F00_0001), port: 443)),
            (
                [0x04], Array(repeating: 0, count: 15) + [1],
                TargetAddress(host: .ipv6(Array(repeating: 0, count: 15) + [1]), port: 443)
            ),
            ([0x03], [11] + Array("example.com".utf8), TargetAddress(host: .domain("example.com"), port: 443)),
        ]
        for (atyp, addr, expected) in cases {
            let (actions, rest) = self.run([self.greeting, self.request(atyp[0], addr)])
            #expect(
                actions == [
                    .send(SOCKS5.methodSelection(.noAuthentication)), .needMoreData, .request(.connect(expected)),
                ]
            )
            #expect(rest.readableBytes == 0)
        }
    }

    @Test func everyByteBoundaryWorks() {
        let all = self.greeting + self.request(0x03, [3] + Array("a.b".utf8)) + Array("early".utf8)
        for split in 1..<all.count {
            let (actions, rest) = self.run([Array(all[..<split]), Array(all[split...])])
            #expect(
                actions.filter { if case .request = $0 { true } else { false } } == [
                    .request(.connect(TargetAddress(host: .domain("a.b"), port: 443)))
                ],
                "split at \(split): \(actions)"
            )
            #expect(String(buffer: rest) == "early")
        }
    }

    @Test func pipelinedGreetingRequestAndDataInOneSegment() {
        let (actions, rest) = self.run([self.greeting + self.request(0x01, [10, 0, 0, 1]) + [1, 2, 3]])
        #expect(
            actions == [
                .send(SOCKS5.methodSelection(.noAuthentication)),
                .request(.connect(TargetAddress(host: .ipv4(0x0A00_0001), port: 443))),
            ]
        )
        #expect(Array(rest.readableBytesView) == [1, 2, 3])
    }

    @Test func noAcceptableMethod() {
        let (actions, _) = self.run([[0x05, 0x02, 0x01, 0x02]])
        guard case .replyAndClose(let bytes, _) = actions.first else {
            Issue.record("\(actions)")
            return
        }
        #expect(Array(bytes.readableBytesView) == [0x05, 0xFF])
    }

    @Test func zeroMethodsIsRefused() {
        guard case .replyAndClose(let bytes, _) = self.run([[0x05, 0x00]]).actions.first else {
            Issue.record()
            return
        }
        #expect(Array(bytes.readableBytesView) == [0x05, 0xFF])
    }

    @Test(arguments: [[UInt8]([0x04, 0x01]), [0x47, 0x45, 0x54], [0x00]])
    func otherProtocolsAreClosedWithoutReply(bytes: [UInt8]) {
        guard case .close = self.run([bytes]).actions.first else {
            Issue.record()
            return
        }
    }

    @Test(arguments: [UInt8(0x02), 0x09])
    func unsupportedCommandsReply07(command: UInt8) {
        let (actions, _) = self.run([self.greeting, self.request(0x01, [1, 2, 3, 4], command: command)])
        guard case .replyAndClose(let bytes, _) = actions.last else {
            Issue.record("\(actions)")
            return
        }
        #expect(Array(bytes.readableBytesView.prefix(2)) == [0x05, 0x07])
    }

    @Test func unsupportedAddressTypeReplies08() {
        let (actions, _) = self.run([self.greeting, [0x05, 0x01, 0x00, 0x02, 1, 2, 3, 4, 0, 80]])
        guard case .replyAndClose(let bytes, _) = actions.last else {
            Issue.record("\(actions)")
            return
        }
        #expect(Array(bytes.readableBytesView.prefix(2)) == [0x05, 0x08])
    }

    @Test func emptyDomainIsAGeneralFailure() {
        let (actions, _) = self.run([self.greeting, self.request(0x03, [0])])
        guard case .replyAndClose(let bytes, _) = actions.last else {
            Issue.record("\(actions)")
            return
        }
        #expect(Array(bytes.readableBytesView.prefix(2)) == [0x05, 0x01])
    }

    @Test func wrongRequestVersionCloses() {
        let (actions, _) = self.run([self.greeting, [0x04, 0x01, 0x00, 0x01, 1, 2, 3, 4, 0, 80]])
        guard case .close = actions.last else {
            Issue.record("\(actions)")
            return
        }
    }

    @Test func replyEncodesBoundAddress() {
        let reply = SOCKS5.reply(.succeeded, bound: TargetAddress(host: .ipv4(0x7F00_0001), port: 0x1F90))
        #expect(Array(reply.readableBytesView) == [0x05, 0x00, 0x00, 0x01, 127, 0, 0, 1, 0x1F, 0x90])
        let failure = SOCKS5.reply(.connectionRefused)
        #expect(Array(failure.readableBytesView) == [0x05, 0x05, 0x00, 0x01, 0, 0, 0, 0, 0, 0])
    }

    /// The shared messages (made once, handed to every connection) stay intact when a receiver consumes its copy.
    @Test func sharedMessagesAreNotChangedByTheirUsers() {
        for _ in 0..<2 {
            var unbound = SOCKS5.reply(.succeeded)
            #expect(Array(unbound.readableBytesView) == [0x05, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0])
            var selected = SOCKS5.methodSelection(.noAuthentication)
            #expect(Array(selected.readableBytesView) == [0x05, 0x00])
            #expect(Array(SOCKS5.methodSelection(.usernamePassword).readableBytesView) == [0x05, 0x02])
            unbound.moveReaderIndex(forwardBy: 4)
            unbound.writeInteger(UInt8(9))
            selected.clear()
        }
    }
}
