import Logging
import Synchronization
import TapAPI
import TunKit

/// Logs one line per request: id, method, path, status, duration, the device and queue it
/// names, and an error's code and errno.
final class RequestLog: Sendable {
    let router: Router
    let logger: Logger
    private let ids = Atomic<UInt64>(0)

    init(router: Router, logger: Logger) {
        self.router = router
        self.logger = logger
    }

    func handle(_ request: HTTPRequest) -> HTTPResponse {
        let start = Clock.monotonicNanoseconds()
        let id = ids.add(1, ordering: .relaxed).newValue
        let response = router.handle(request)
        let micros = (Clock.monotonicNanoseconds() - start) / 1000
        var fields: Logger.Metadata = [
            "request_id": "\(id)", "method": "\(request.method)", "path": "\(request.path)",
            "status": "\(response.status)", "us": "\(micros)",
        ]
        switch request.transport {
        case .unix(let peer?):
            fields["pid"] = "\(peer.pid)"
            fields["uid"] = "\(peer.uid)"
            fields["gid"] = "\(peer.gid)"
        case .unix(nil):
            break
        case .tcp:
            fields["transport"] = "tcp"
        }
        if let route = Route(path: request.path) {
            if let d = route.device { fields["device"] = "\(d)" }
            if let q = route.queueID { fields["queue"] = "\(q)" }
        }
        if let e = response.errorInfo {
            fields["code"] = "\(e.code)"
            if let errno = e.errno { fields["errno"] = "\(errno)" }
        }
        logger.log(level: response.status >= 500 ? .error : .info, "request", metadata: fields)
        return response
    }
}
