// A JVM that resolves a name once and keeps the address for ever
// (networkaddress.cache.ttl=-1, as with a security manager), then dials it
// again each time a line arrives on stdin. Prints "ok" or "failed: ..." per dial.
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.security.Security;

public class KeepAddress {
    public static void main(String[] args) throws Exception {
        Security.setProperty("networkaddress.cache.ttl", "-1");
        String name = args[0];
        int port = Integer.parseInt(args[1]);
        int timeoutMs = Integer.parseInt(args[2]);
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
        do {
            // Cached after the first call: the JVM never asks again.
            InetAddress address = InetAddress.getByName(name);
            try (Socket s = new Socket()) {
                s.connect(new InetSocketAddress(address, port), timeoutMs);
                System.out.println("ok " + address.getHostAddress());
            } catch (Exception e) {
                System.out.println("failed: " + e);
            }
            System.out.flush();
        } while (in.readLine() != null);
    }
}
