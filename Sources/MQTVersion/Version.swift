/// The version of mqtapd and mqtap, as `/v1/health`, `--version` and `/metrics` report it.
public enum Version {
    public static let current = "0.1.0"
}
