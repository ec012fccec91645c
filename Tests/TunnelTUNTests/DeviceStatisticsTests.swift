import Testing

@testable import TunnelTUN

struct DeviceStatisticsTests {
    let text = """
        Inter-|   Receive                                                |  Transmit
         face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
            lo: 2162232330515 214022400    0 3938    0     0          0         0 2162232330515 214022400    0    0    0     0       0          0
        tunnel0: 813700 9150    0    0    0     0          0         0 3900000000 2604095    0 454020    0     0       0          0
        """

    @Test func transmitCountersOfTheNamedDevice() {
        #expect(
            DeviceStatistics.parse(self.text, device: "tunnel0")
                == DeviceStatistics(transmitPackets: 2_604_095, transmitDrops: 454_020)
        )
        #expect(DeviceStatistics.parse(self.text, device: "lo")?.transmitDrops == 0)
    }

    @Test func anUnlistedDeviceOrABrokenLineIsNil() {
        #expect(DeviceStatistics.parse(self.text, device: "tunnel1") == nil)
        #expect(DeviceStatistics.parse("tunnel0: 1 2 3", device: "tunnel0") == nil)
        #expect(DeviceStatistics.parse("", device: "lo") == nil)
    }

    @Test func thisProcessSeesItsLoopback() {
        #expect(DeviceStatistics.read(device: "lo") != nil)
    }
}
