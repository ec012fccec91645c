import NIOCore

/// The type-length-value encoding of the handshake parameters and of CONTROL frames:
/// `type u8, length u16 BE, value[length]`. Readers skip types they do not know, so later versions can add
/// fields.
extension ByteBuffer {
    /// Appends one TLV whose value `write` produces.
    mutating func writeTLV(_ tag: UInt8, _ write: (inout ByteBuffer) -> Void) {
        self.writeInteger(tag)
        let lengthIndex = self.writerIndex
        self.writeInteger(UInt16(0))
        let start = self.writerIndex
        write(&self)
        self.setInteger(UInt16(self.writerIndex - start), at: lengthIndex)
    }

    /// Reads the next TLV: nil at the end, `malformed` when the buffer ends inside one.
    mutating func readTLV(
        malformed: @autoclosure () -> ProtocolError
    ) throws(ProtocolError) -> (tag: UInt8, value: ByteBuffer)? {
        guard self.readableBytes > 0 else { return nil }
        guard let tag = self.readInteger(as: UInt8.self), let length = self.readInteger(as: UInt16.self),
            let value = self.readSlice(length: Int(length))
        else {
            throw malformed()
        }
        return (tag, value)
    }
}
