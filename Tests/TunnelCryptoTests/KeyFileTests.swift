import Foundation
import Testing

@testable import TunnelCrypto

struct KeyFileTests {
    func temporaryPath() -> String {
        FileManager.default.temporaryDirectory.appendingPathComponent("keyfile-\(UUID().uuidString)").path
    }

    @Test func generateWritesMode0600AndLoadsBack() throws {
        let path = temporaryPath()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let publicKey = try KeyFile.generate(at: path, force: false)
        let attributes = try FileManager.default.attributesOfItem(atPath: path)
        #expect((attributes[.posixPermissions] as? NSNumber)?.intValue == 0o600)
        let (key, insecure) = try KeyFile.load(from: path)
        #expect(key.publicKey == publicKey)
        #expect(!insecure)
        let text = try String(contentsOfFile: path, encoding: .utf8)
        #expect(text.hasSuffix("\n"))
        #expect(text.count == 45)
    }

    @Test func refusesToOverwriteWithoutForce() throws {
        let path = temporaryPath()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let first = try KeyFile.generate(at: path, force: false)
        #expect(throws: KeyFile.Error.self) { _ = try KeyFile.generate(at: path, force: false) }
        #expect(try KeyFile.load(from: path).key.publicKey == first)
        chmod(path, 0o644)
        let second = try KeyFile.generate(at: path, force: true)
        #expect(second != first)
        let attributes = try FileManager.default.attributesOfItem(atPath: path)
        #expect((attributes[.posixPermissions] as? NSNumber)?.intValue == 0o600)
    }

    @Test(arguments: ["", "not base64!!\n", "AAAA\n", "QUJD\nQUJD\n"])
    func malformedFilesAreRejectedWithTheirPath(content: String) throws {
        let path = temporaryPath()
        defer { try? FileManager.default.removeItem(atPath: path) }
        try content.write(toFile: path, atomically: false, encoding: .utf8)
        do {
            _ = try KeyFile.load(from: path)
            Issue.record("expected failure")
        } catch {
            #expect(error.description.hasPrefix(path))
        }
    }

    @Test func missingFileIsAnError() {
        #expect(throws: KeyFile.Error.self) { _ = try KeyFile.load(from: "/nonexistent/dir/key") }
    }
}
