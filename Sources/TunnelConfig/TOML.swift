/// A value from a configuration file.
public enum ConfigValue: Equatable, Sendable {
    case string(String)
    case integer(Int)
    case boolean(Bool)
    case array([ConfigValue])

    var typeName: String {
        switch self {
        case .string: "a string"
        case .integer: "an integer"
        case .boolean: "a boolean"
        case .array: "an array"
        }
    }
}

/// One `key = value` with where it came from.
public struct ConfigEntry: Equatable, Sendable {
    public var value: ConfigValue
    /// 1-based line number in the file.
    public var line: Int
}

/// A parse error: `line` is 1-based.
public struct TOMLError: Error, Equatable, Sendable, CustomStringConvertible {
    public var line: Int
    public var message: String
    public var description: String { "line \(self.line): \(self.message)" }
}

/// A strict parser for the TOML subset configuration files need: comments, `key = value` with bare or quoted
/// keys, `[table]` headers (keys become `table.key`), basic and literal strings, integers, booleans and
/// (multi-line) arrays. Anything else is an error with its line, never silently ignored.
public enum TOMLParser {
    public static func parse(_ text: String) throws(TOMLError) -> [String: ConfigEntry] {
        var parser = Parser(Array(text.utf8))
        return try parser.parseDocument()
    }

    private struct Parser {
        let bytes: [UInt8]
        var index = 0
        var line = 1

        init(_ bytes: [UInt8]) { self.bytes = bytes }

        var current: UInt8? { self.index < self.bytes.count ? self.bytes[self.index] : nil }

        func error(_ message: String) -> TOMLError { TOMLError(line: self.line, message: message) }

        mutating func advance() {
            if self.current == UInt8(ascii: "\n") { self.line += 1 }
            self.index += 1
        }

        mutating func skipSpaces() {
            while let c = self.current, c == UInt8(ascii: " ") || c == UInt8(ascii: "\t") { self.advance() }
        }

        mutating func skipComment() {
            if self.current == UInt8(ascii: "#") {
                while let c = self.current, c != UInt8(ascii: "\n") { self.advance() }
            }
        }

        /// Skips blanks, newlines and comments (inside arrays).
        mutating func skipWhitespaceAndComments() {
            while true {
                self.skipSpaces()
                self.skipComment()
                if self.current == UInt8(ascii: "\n") || self.current == UInt8(ascii: "\r") {
                    self.advance()
                } else {
                    return
                }
            }
        }

        mutating func expectEndOfLine() throws(TOMLError) {
            self.skipSpaces()
            self.skipComment()
            if self.current == UInt8(ascii: "\r") { self.advance() }
            guard let c = self.current else { return }
            guard c == UInt8(ascii: "\n") else {
                throw self.error("unexpected '\(String(decoding: [c], as: UTF8.self))' after value")
            }
            self.advance()
        }

        mutating func parseDocument() throws(TOMLError) -> [String: ConfigEntry] {
            var result: [String: ConfigEntry] = [:]
            var table = ""
            while true {
                self.skipWhitespaceAndComments()
                guard let c = self.current else { return result }
                if c == UInt8(ascii: "[") {
                    self.advance()
                    self.skipSpaces()
                    guard self.current != UInt8(ascii: "[") else {
                        throw self.error("arrays of tables are not supported")
                    }
                    let name = try self.parseKey()
                    self.skipSpaces()
                    guard self.current == UInt8(ascii: "]") else { throw self.error("expected ']' after table name") }
                    self.advance()
                    try self.expectEndOfLine()
                    table = name
                    continue
                }
                let keyLine = self.line
                let key = try self.parseKey()
                self.skipSpaces()
                guard self.current == UInt8(ascii: "=") else { throw self.error("expected '=' after key '\(key)'") }
                self.advance()
                self.skipSpaces()
                let value = try self.parseValue()
                try self.expectEndOfLine()
                let fullKey = table.isEmpty ? key : "\(table).\(key)"
                guard result[fullKey] == nil else {
                    throw TOMLError(line: keyLine, message: "key '\(fullKey)' is defined twice")
                }
                result[fullKey] = ConfigEntry(value: value, line: keyLine)
            }
        }

        mutating func parseKey() throws(TOMLError) -> String {
            var parts: [String] = []
            while true {
                self.skipSpaces()
                if self.current == UInt8(ascii: "\"") || self.current == UInt8(ascii: "'") {
                    guard case .string(let s) = try self.parseValue() else { throw self.error("bad quoted key") }
                    parts.append(s)
                } else {
                    let start = self.index
                    while let c = self.current, Self.isBareKeyByte(c) { self.advance() }
                    guard self.index > start else {
                        let found = self.current.map { String(decoding: [$0], as: UTF8.self) } ?? "end of file"
                        throw self.error("expected a key, found '\(found)'")
                    }
                    parts.append(String(decoding: self.bytes[start..<self.index], as: UTF8.self))
                }
                self.skipSpaces()
                guard self.current == UInt8(ascii: ".") else { break }
                self.advance()
            }
            return parts.joined(separator: ".")
        }

        static func isBareKeyByte(_ c: UInt8) -> Bool {
            (c >= UInt8(ascii: "a") && c <= UInt8(ascii: "z")) || (c >= UInt8(ascii: "A") && c <= UInt8(ascii: "Z"))
                || (c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9")) || c == UInt8(ascii: "_")
                || c == UInt8(ascii: "-")
        }

        mutating func parseValue() throws(TOMLError) -> ConfigValue {
            guard let c = self.current else { throw self.error("expected a value, found end of file") }
            switch c {
            case UInt8(ascii: "\""):
                return .string(try self.parseBasicString())
            case UInt8(ascii: "'"):
                return .string(try self.parseLiteralString())
            case UInt8(ascii: "["):
                return try self.parseArray()
            case UInt8(ascii: "t"), UInt8(ascii: "f"):
                let start = self.index
                while let c = self.current, Self.isBareKeyByte(c) { self.advance() }
                switch String(decoding: self.bytes[start..<self.index], as: UTF8.self) {
                case "true": return .boolean(true)
                case "false": return .boolean(false)
                case let word: throw self.error("unknown value '\(word)' (strings need quotes)")
                }
            case UInt8(ascii: "+"), UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"):
                let start = self.index
                self.advance()
                while let c = self.current, (c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9")) || c == UInt8(ascii: "_")
                {
                    self.advance()
                }
                let text = String(decoding: self.bytes[start..<self.index], as: UTF8.self)
                if let c = self.current,
                    c == UInt8(ascii: ".") || c == UInt8(ascii: "e") || c == UInt8(ascii: "E") || c == UInt8(ascii: ":")
                {
                    // An address, a CIDR or a fraction written without quotes: show the value as it should be.
                    while let c = self.current, c > 0x20, c != UInt8(ascii: "#"), c != UInt8(ascii: ","),
                        c != UInt8(ascii: "]")
                    {
                        self.advance()
                    }
                    let word = String(decoding: self.bytes[start..<self.index], as: UTF8.self)
                    throw self.error("\(word) needs quotes: write \"\(word)\" (only whole numbers go without them)")
                }
                guard !text.hasSuffix("_"), !text.contains("__"), let value = Int(String(text.filter { $0 != "_" }))
                else {
                    throw self.error("invalid number '\(text)'")
                }
                return .integer(value)
            default:
                throw self.error(
                    "unexpected '\(String(decoding: [c], as: UTF8.self))' where a value should be (strings need quotes)"
                )
            }
        }

        mutating func parseArray() throws(TOMLError) -> ConfigValue {
            self.advance()
            var items: [ConfigValue] = []
            while true {
                self.skipWhitespaceAndComments()
                if self.current == UInt8(ascii: "]") {
                    self.advance()
                    return .array(items)
                }
                items.append(try self.parseValue())
                self.skipWhitespaceAndComments()
                if self.current == UInt8(ascii: ",") {
                    self.advance()
                    continue
                }
                guard self.current == UInt8(ascii: "]") else { throw self.error("expected ',' or ']' in array") }
            }
        }

        mutating func parseLiteralString() throws(TOMLError) -> String {
            self.advance()
            let start = self.index
            while let c = self.current, c != UInt8(ascii: "'") {
                guard c != UInt8(ascii: "\n") else { throw self.error("unterminated string") }
                self.advance()
            }
            guard self.current != nil else { throw self.error("unterminated string") }
            let text = String(decoding: self.bytes[start..<self.index], as: UTF8.self)
            self.advance()
            return text
        }

        mutating func parseBasicString() throws(TOMLError) -> String {
            self.advance()
            var out: [UInt8] = []
            while true {
                guard let c = self.current, c != UInt8(ascii: "\n") else { throw self.error("unterminated string") }
                self.advance()
                if c == UInt8(ascii: "\"") { break }
                guard c == UInt8(ascii: "\\") else {
                    out.append(c)
                    continue
                }
                guard let e = self.current else { throw self.error("unterminated string") }
                self.advance()
                switch e {
                case UInt8(ascii: "\""): out.append(UInt8(ascii: "\""))
                case UInt8(ascii: "\\"): out.append(UInt8(ascii: "\\"))
                case UInt8(ascii: "n"): out.append(UInt8(ascii: "\n"))
                case UInt8(ascii: "t"): out.append(UInt8(ascii: "\t"))
                case UInt8(ascii: "r"): out.append(UInt8(ascii: "\r"))
                case UInt8(ascii: "u"), UInt8(ascii: "U"):
                    let digits = e == UInt8(ascii: "u") ? 4 : 8
                    guard self.index + digits <= self.bytes.count,
                        let scalarValue = UInt32(
                            String(decoding: self.bytes[self.index..<self.index + digits], as: UTF8.self),
                            radix: 16
                        ),
                        let scalar = Unicode.Scalar(scalarValue)
                    else { throw self.error("invalid unicode escape") }
                    for _ in 0..<digits { self.advance() }
                    out.append(contentsOf: Array(String(Character(scalar)).utf8))
                default:
                    throw self.error("invalid escape '\\\(String(decoding: [e], as: UTF8.self))'")
                }
            }
            guard let text = String(validating: out, as: UTF8.self) else {
                throw self.error("string is not valid UTF-8")
            }
            return text
        }
    }
}
