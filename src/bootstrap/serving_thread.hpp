// The bootstrap server run by rank 0 of a TCP bootstrap: the launcher's BootstrapServer
// (src/launcher/bootstrap_server.*, one implementation for both) driven by a thread of its own.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <thread>

namespace epcomm::launch {
class BootstrapServer;
}

namespace epcomm {

class ServingThread {
 public:
  // Listens on TCP `port` (every local address) for `world_size` ranks presenting `secret`; a
  // connection gets at most `hello_deadline` (the bootstrap timeout) to say hello. Throws
  // Error(kInternal) when the port cannot be listened on (naming it).
  ServingThread(int world_size, int port, const std::string& secret, std::chrono::milliseconds hello_deadline);
  // Sends what is still queued (bounded), then stops serving: the other ranks' connections close.
  ~ServingThread();
  ServingThread(const ServingThread&) = delete;
  ServingThread& operator=(const ServingThread&) = delete;

  int port() const { return port_; }

 private:
  void serve();

  std::unique_ptr<launch::BootstrapServer> server_;
  int port_ = 0;
  int wake_[2] = {-1, -1};  // a byte on wake_[1] asks the thread to stop
  std::thread thread_;
};

}  // namespace epcomm
