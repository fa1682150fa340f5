extension StringProtocol {
    /// Without leading and trailing whitespace (a sysfs value's newline, a header's spaces):
    /// the one trimming helper.
    public var trimmingWhitespace: String {
        var s = Substring(self)
        while let c = s.first, c.isWhitespace { s.removeFirst() }
        while let c = s.last, c.isWhitespace { s.removeLast() }
        return String(s)
    }
}
